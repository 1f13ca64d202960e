"""Coalesced delivery: frames ready in one tick leave in one write, in order, once.

- the coalescer alone (MockClock that never moves: it waits on no timer):
  a lone mark is flushed after three scheduler passes, a burst that keeps
  adding frames after at most MAX_PASSES;
- real sockets (the path the coalescer writes): a replay page plus its reply
  is a handful of writes, not one per frame; a subscriber that replays one
  channel while live events of it and of another channel keep arriving gets
  every event of each channel exactly once and in id order.
- writes at once after idleness: `begin_direct` says yes only after
  DIRECT_AFTER_IDLE of idleness (MockClock), and the round after it commits
  the tally; on real sockets a lone event is written to every subscriber
  from within its dispatch, the burst behind it is still merged, and an
  event written at once to others queues behind a full subscriber's frames;
  with a Bearer header the 101 and the `connected` push share one write.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio
import trio.testing
from wsproto.events import Message

from apix_trio.gateway import coalesce
from apix_trio.gateway.coalesce import WriteCoalescer
from apix_trio.gateway.handshake import handle_stream
from apix_trio.gateway.websocket import ServerWebSocket
from apix_trio.settings import ChannelOptions, Namespace
from tests.memws import MemClient
from tests.serverkit import running_server
from tests.test_slow_consumer import authed, socket_client

pytestmark = pytest.mark.timeout(60)

NAMESPACES = (Namespace("mix.>", ChannelOptions(history_size=10_000, history_ttl=3600)),)


@pytest.fixture
def frozen_clock() -> trio.testing.MockClock:
    """Time stands still: anything waiting on a timer would hang (and time out)."""
    return trio.testing.MockClock()


class Recorder:
    def __init__(self) -> None:
        self.flushes = 0

    def flush_ready(self) -> None:
        self.flushes += 1


async def passes_until_flushed(recorder: Recorder, flushes: int) -> int:
    """Scheduler passes (this task's turns) until the recorder was flushed."""
    passes = 0
    while recorder.flushes < flushes:
        await trio.lowlevel.cancel_shielded_checkpoint()
        passes += 1
        assert passes < 100, "never flushed"
    return passes


async def test_a_lone_mark_is_flushed_after_three_passes_without_a_timer(frozen_clock):
    coalescer = WriteCoalescer()
    recorder = Recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(coalescer.serve)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        coalescer.added += 1
        coalescer.mark(recorder)
        passes = await passes_until_flushed(recorder, 1)
        assert trio.current_time() == start  # nothing waited on a clock
        nursery.cancel_scope.cancel()
    assert 3 <= passes <= 4
    assert coalescer.pending() == 0


async def test_a_burst_is_flushed_once_it_stops_or_after_max_passes(frozen_clock):
    coalescer = WriteCoalescer()
    recorder = Recorder()

    async def keep_adding(times: int) -> None:
        for _ in range(times):
            coalescer.added += 1
            await trio.lowlevel.cancel_shielded_checkpoint()

    async with trio.open_nursery() as nursery:
        await nursery.start(coalescer.serve)
        await trio.testing.wait_all_tasks_blocked()
        # A burst over 2 passes: flushed soon after it stops, before the cap.
        coalescer.mark(recorder)
        nursery.start_soon(keep_adding, 2)
        short = await passes_until_flushed(recorder, 1)
        await trio.testing.wait_all_tasks_blocked()
        # A burst that does not stop: flushed at the cap all the same.
        coalescer.mark(recorder)
        nursery.start_soon(keep_adding, 10_000)
        capped = await passes_until_flushed(recorder, 2)
        nursery.cancel_scope.cancel()
    assert 3 <= short <= 6 < coalesce.MAX_PASSES
    assert coalesce.MAX_PASSES - 1 <= capped <= coalesce.MAX_PASSES + 2


async def test_a_replay_page_is_a_few_writes_not_one_per_frame(tmp_path, monkeypatch):
    writes: dict[int, list[int]] = {}
    real = ServerWebSocket.try_send_nowait

    def counting(self: ServerWebSocket, data: bytes) -> int:
        written = real(self, data)
        writes.setdefault(id(self), []).append(written)
        return written

    monkeypatch.setattr(ServerWebSocket, "try_send_nowait", counting)
    async with running_server(
        tmp_path, limits={"ops_per_second": 1e6}, namespaces=NAMESPACES
    ) as kit:
        with trio.fail_after(30):
            pub = await socket_client(kit)
            await authed(kit, pub)
            for n in range(200):
                assert (await pub.call("publish", channel="mix.page", data=n))["ok"]
            sub = await socket_client(kit)
            conn_id = (await authed(kit, sub))["conn"]
            conn = kit.hub.registry.get(conn_id)
            assert conn is not None
            mine = writes.setdefault(id(conn.ws), [])
            before = len(mine)
            reply = await sub.call("subscribe", channel="mix.page", since="0")
            assert reply["result"]["replayed"] == 200
            replay_writes = mine[before:]
    # 200 event frames and the reply: each write carried many frames.
    assert 1 <= len(replay_writes) <= 10, replay_writes
    assert sum(replay_writes) > 200 * 50


def ids_of(frames: list[dict[str, Any]], channel: str) -> list[str]:
    return [
        frame["event"]["id"]
        for frame in frames
        if frame.get("push") == "event" and frame["channel"] == channel
    ]


async def publish_until(pub: MemClient, stop: trio.Event) -> None:
    """Pipelined publishes (8 in flight) alternating between mix.a and mix.b."""
    sent = acked = 0
    while not stop.is_set() or acked < sent:
        while not stop.is_set() and sent - acked < 8:
            sent += 1
            channel = ("mix.a", "mix.b")[sent % 2]
            await pub.send({"op": "publish", "id": sent, "channel": channel, "data": sent})
        reply = await pub.recv()
        assert reply is not None and reply["ok"], reply
        acked += 1


async def history_ids(kit: Any, channel: str, after: str) -> list[str]:
    hub = kit.hub
    page = await hub.broker.read_after(
        "acme", channel, after, 100_000, hub.namespaces.retention(channel)
    )
    return [event.id for event in page.events]


@pytest.mark.parametrize("transport", ["socket", "memory"])
async def test_order_and_exactly_once_under_mixed_live_and_replay(tmp_path, transport):
    async with running_server(
        tmp_path, limits={"ops_per_second": 1e6, "outbox_size": 4096}, namespaces=NAMESPACES
    ) as kit:
        with trio.fail_after(40):
            pub = await socket_client(kit)
            await authed(kit, pub)
            for n in range(1200):  # more than two replay pages
                await pub.send({"op": "publish", "id": n + 1, "channel": "mix.a", "data": n})
            for _ in range(1200):
                reply = await pub.recv()
                assert reply is not None and reply["ok"]
            async with trio.open_nursery() as nursery:
                if transport == "socket":
                    sub = await socket_client(kit)
                else:  # trio's memory streams: no descriptor, the writer task writes
                    client_stream, server_stream = trio.testing.memory_stream_pair()
                    nursery.start_soon(handle_stream, kit.hub, server_stream)
                    sub = MemClient(client_stream)
                    await sub.handshake([])
                await mixed_traffic(kit, pub, sub)
                await sub.stream.aclose()


async def mixed_traffic(kit: Any, pub: MemClient, sub: MemClient) -> None:
    await authed(kit, sub)
    reply = await sub.call("subscribe", channel="mix.b")  # live from here on
    b_start = reply["result"]["position"]
    stop = trio.Event()
    frames: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(publish_until, pub, stop)
        await trio.sleep(0.05)  # live traffic on both channels first
        await sub.send({"op": "subscribe", "id": 99, "channel": "mix.a", "since": "0"})
        replied = False
        while not replied or len(frames) < 1600:
            frame = await sub.recv()
            assert frame is not None, sub.close_code
            frames.append(frame)
            replied = replied or frame.get("id") == 99
        stop.set()
    expected_a = await history_ids(kit, "mix.a", "0")
    expected_b = await history_ids(kit, "mix.b", b_start)
    while ids_of(frames, "mix.a")[-1:] != expected_a[-1:] or (
        ids_of(frames, "mix.b")[-1:] != expected_b[-1:]
    ):
        frame = await sub.recv()
        assert frame is not None, sub.close_code
        frames.append(frame)
    # Every event of each channel exactly once, in id order, no gap.
    assert ids_of(frames, "mix.a") == expected_a
    assert ids_of(frames, "mix.b") == expected_b
    assert len(expected_a) > 1200 and expected_b


class Committed:
    def __init__(self) -> None:
        self.commits = 0

    def __call__(self) -> None:
        self.commits += 1


async def test_after_idleness_a_frame_may_be_written_at_once_sooner_not(frozen_clock):
    coalescer = WriteCoalescer()
    committed = Committed()
    coalescer.after_flush = committed
    recorder = Recorder()
    frame, other = b"\x81\x01a", b"\x81\x01b"
    async with trio.open_nursery() as nursery:
        await nursery.start(coalescer.serve)
        await trio.testing.wait_all_tasks_blocked()
        assert coalescer.idle
        # Idle for less than DIRECT_AFTER_IDLE: queue as usual.
        assert not coalescer.begin_direct(frame)
        assert not coalescer.idle and coalescer.direct_frame is None
        coalescer.mark(recorder)
        await passes_until_flushed(recorder, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert coalescer.idle and committed.commits == 1
        # Idle long enough: this frame (and only it) goes out at once until
        # the next flush, which commits the tally and clears it.
        frozen_clock.jump(coalesce.DIRECT_AFTER_IDLE)
        assert coalescer.begin_direct(frame)
        assert not coalescer.idle and coalescer.direct_frame is frame
        assert other is not coalescer.direct_frame
        await trio.testing.wait_all_tasks_blocked()
        assert committed.commits == 2 and coalescer.direct_frame is None
        assert coalescer.idle  # after its quiet look
        nursery.cancel_scope.cancel()
    assert not coalescer.idle


class WriteLog:
    """Every non-blocking socket write: (websocket, inside a coalescer flush, bytes)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.writes: list[tuple[int, bool, int]] = []
        self.flushing = False
        real_write = ServerWebSocket.try_send_nowait
        real_flush = WriteCoalescer.flush_all

        def write(ws: ServerWebSocket, data: bytes) -> int:
            written = real_write(ws, data)
            self.writes.append((id(ws), self.flushing, written))
            return written

        def flush_all(coalescer: WriteCoalescer) -> None:
            self.flushing = True
            try:
                real_flush(coalescer)
            finally:
                self.flushing = False

        monkeypatch.setattr(ServerWebSocket, "try_send_nowait", write)
        monkeypatch.setattr(WriteCoalescer, "flush_all", flush_all)

    def of(self, ws: ServerWebSocket, since: int = 0) -> list[tuple[bool, int]]:
        return [(flushing, n) for key, flushing, n in self.writes[since:] if key == id(ws)]


async def test_a_lone_event_is_written_at_once_and_a_burst_behind_it_coalesced(
    tmp_path, monkeypatch
):
    """After idleness the event is written to every subscriber from within its
    dispatch (no coalescer round first); the pipelined burst that follows is
    merged into a few writes; everything arrives once, in order, and counted."""
    monkeypatch.setattr(coalesce, "DIRECT_AFTER_IDLE", 0.0)
    log = WriteLog(monkeypatch)
    async with running_server(tmp_path, limits={"ops_per_second": 1e6}) as kit:
        with trio.fail_after(30):
            pub = await socket_client(kit)
            await authed(kit, pub)
            subs = [await socket_client(kit) for _ in range(3)]
            sockets = []
            for sub in subs:
                conn = kit.hub.registry.get((await authed(kit, sub))["conn"])
                assert conn is not None
                sockets.append(conn.ws)
                assert (await sub.call("subscribe", channel="mix.lone"))["ok"]
            await trio.testing.wait_all_tasks_blocked()
            assert kit.hub.coalescer.idle
            delivered = kit.hub.metrics.delivered._value.get()
            start = len(log.writes)
            await pub.send({"op": "publish", "id": 100, "channel": "mix.lone", "data": 0})
            for sub in subs:
                frame = await sub.recv()
                assert frame is not None and frame["event"]["data"] == 0
            for ws in sockets:
                [(flushing, written)] = log.of(ws, start)
                assert not flushing and written > 0  # the whole frame, during the dispatch
            reply = await pub.recv()
            assert reply is not None and reply["ok"]
            await trio.testing.wait_all_tasks_blocked()
            assert kit.hub.metrics.delivered._value.get() == delivered + 3  # tally committed

            # A burst, sent in one write: the first event may go out at once,
            # the rest is coalesced.
            start = len(log.writes)
            burst = b"".join(
                pub.ws.send(
                    Message(
                        data=orjson.dumps(
                            {"op": "publish", "id": 200 + n, "channel": "mix.lone", "data": n + 1}
                        ).decode()
                    )
                )
                for n in range(30)
            )
            await pub.stream.send_all(burst)
            for sub in subs:
                seen = [(await sub.recv() or {})["event"]["data"] for _ in range(30)]
                assert seen == list(range(1, 31))
            for ws in sockets:
                assert len(log.of(ws, start)) <= 10, log.of(ws, start)


async def test_an_event_written_at_once_never_overtakes_queued_frames(tmp_path, monkeypatch):
    """A subscriber whose socket is full has frames queued: later events,
    even ones written at once to everybody else, queue behind them."""
    monkeypatch.setattr(coalesce, "DIRECT_AFTER_IDLE", 0.0)
    log = WriteLog(monkeypatch)
    async with running_server(tmp_path, limits={"ops_per_second": 1e6, "outbox_size": 4096}) as kit:
        with trio.fail_after(30):
            pub = await socket_client(kit)
            await authed(kit, pub)
            slow = await socket_client(kit, rcvbuf=4096)
            slow_conn = kit.hub.registry.get((await authed(kit, slow))["conn"])
            fast = await socket_client(kit)
            fast_conn = kit.hub.registry.get((await authed(kit, fast))["conn"])
            assert slow_conn is not None and fast_conn is not None
            for client in (slow, fast):
                assert (await client.call("subscribe", channel="mix.full"))["ok"]
            data = "x" * 4000
            sent = 0
            start = len(log.writes)
            # Lone events, each after idleness, until the slow socket is full
            # and more than one frame waits in its outbox; then a few more.
            extra = 5
            while extra:
                await trio.testing.wait_all_tasks_blocked()
                assert kit.hub.coalescer.idle
                sent += 1
                assert (await pub.call("publish", channel="mix.full", data=[sent, data]))["ok"]
                frame = await fast.recv()
                assert frame is not None and frame["event"]["data"][0] == sent
                if len(slow_conn.outbox) > 1:
                    extra -= 1
                assert sent < 2000, "the slow socket never filled"
            fast_writes = log.of(fast_conn.ws, start)
            assert all(not flushing for flushing, _ in fast_writes)  # all at once
            # The slow subscriber reads again: every event once, in order.
            seen = [(await slow.recv() or {})["event"]["data"][0] for _ in range(sent)]
            assert seen == list(range(1, sent + 1))


async def test_header_auth_answers_101_and_connected_in_one_write(tmp_path, monkeypatch):
    """With a Bearer header, the 101 waits for the `connected` push and both
    leave in one system call; the client sees a normal upgrade and push."""
    log = WriteLog(monkeypatch)
    awaited: list[int] = []
    real_send = ServerWebSocket._send

    async def counting_send(ws: ServerWebSocket, data: bytes) -> None:
        awaited.append(id(ws))
        await real_send(ws, data)

    monkeypatch.setattr(ServerWebSocket, "_send", counting_send)
    async with running_server(tmp_path) as kit:
        with trio.fail_after(30):
            sock = trio.socket.socket()
            await sock.connect(("127.0.0.1", kit.running.ws_port))
            client = MemClient(trio.SocketStream(sock))
            await client.handshake([(b"authorization", f"Bearer {kit.token()}".encode())])
            pushed = await client.recv()
            assert pushed is not None and pushed["push"] == "connected"
            conn = kit.hub.registry.get(pushed["conn"])
            assert conn is not None
            assert id(conn.ws) not in awaited  # no write of its own for the 101
            [(flushing, written)] = log.of(conn.ws)
            assert not flushing and written > 0
            reply = await client.call("subscribe", channel="mix.after")
            assert reply["ok"]
