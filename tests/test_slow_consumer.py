"""Slow consumers: a subscriber that stops reading is closed with 4009, nobody else waits.

Two settings:

- real sockets: the slow client really stops reading a TCP socket with a
  tiny receive buffer, so the server's socket write blocks and the outbox
  fills. A well-behaved subscriber of the same channel gets every event,
  in order, without gaps, meanwhile. When the slow client reads again it
  gets a prefix of the events, then the close frame 4009.
- in memory, on a MockClock: a stream with a 16-byte buffer (a write waits
  while the peer does not read) makes the stall exact, so the event that
  trips the limit and the moment the server gives up on the stuck write are
  asserted exactly.

What a slow client sees depends on whether it reads again within the send
timeout (`gateway.SEND_TIMEOUT`, 10 s) of the write that got stuck: if it
does, the stuck write completes and the close frame 4009 follows it; if not,
the server gives up on the socket at that timeout, counts the connection in
`apix_slow_consumers` and closes 4009 in its metrics and log, but the client
only sees the TCP connection end (no close frame can get through a full
socket). The real-socket tests raise the timeout so that the first case is
certain; the MockClock test pins the second.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import trio
import trio.testing
from wsproto.events import CloseConnection

from apix_trio.gateway import handshake as gateway
from apix_trio.gateway.handshake import handle_stream
from apix_trio.gateway.hub import Hub
from apix_trio.settings import ChannelOptions, Namespace
from tests.checks import sample
from tests.memws import MemClient, MemHub, memory_hub
from tests.serverkit import Kit, running_server

pytestmark = pytest.mark.timeout(60)

CHANNEL = "feed.flood"
WINDOW = 32  # events in flight at once: always below the good subscriber's outbox
MAX_EVENTS = 5_000  # the flood never goes past this, whatever happens
EXTRA_WINDOWS = 3  # windows published after the slow consumer was closed


async def socket_client(kit: Kit, *, rcvbuf: int | None = None) -> MemClient:
    """A wsproto client over a real TCP socket (optionally with a tiny receive buffer)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        # Before connect, so the advertised window (and its scale) stays small.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", kit.running.ws_port))
    client = MemClient(trio.SocketStream(sock))
    await client.handshake([])
    return client


async def authed(kit_or_mem: Kit | MemHub, client: MemClient) -> dict[str, Any]:
    reply = await client.call("auth", token=kit_or_mem.token())
    assert reply["ok"], reply
    result: dict[str, Any] = reply["result"]
    return result


async def hang_up(*clients: MemClient) -> None:
    for client in clients:
        await client.stream.aclose()


async def wait_eof(client: MemClient) -> None:
    """Read until the server closes the TCP stream (it does so after its cleanup)."""
    while await client.stream.receive_some(65536):
        pass


async def publish_window(pub: MemClient, first: int, count: int, pad: str) -> list[str]:
    """Pipeline `count` publishes, then collect their ids in order."""
    for n in range(first, first + count):
        await pub.send(
            {"op": "publish", "id": n + 1, "channel": CHANNEL, "data": {"n": n, "pad": pad}}
        )
    ids = []
    for n in range(first, first + count):
        reply = await pub.recv()
        assert reply is not None and reply["id"] == n + 1 and reply["ok"], reply
        ids.append(reply["result"]["id"])
    return ids


async def receive_events(client: MemClient, count: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while len(events) < count:
        frame = await client.recv()
        assert frame is not None, f"closed with {client.close_code}"
        if frame.get("push") == "event":
            events.append(frame["event"])
    return events


def event_ids(events: list[dict[str, Any]]) -> list[str]:
    return [event["id"] for event in events]


def assert_increasing(ids: list[str]) -> None:
    keys = [tuple(int(part) for part in event_id.split("-")) for event_id in ids]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


# -- real sockets -------------------------------------------------------------


async def test_stalled_subscriber_gets_4009_while_a_good_one_gets_every_event(
    tmp_path, monkeypatch
):
    # The slow client resumes reading only after the flood: the server's write
    # to it must still be in flight then, so the close frame can follow it.
    monkeypatch.setattr(gateway, "SEND_TIMEOUT", 120.0)
    async with running_server(tmp_path, limits={"outbox_size": 64, "ops_per_second": 1e6}) as kit:
        metrics = kit.hub.metrics
        with trio.fail_after(40):
            slow = await socket_client(kit, rcvbuf=4096)
            good = await socket_client(kit)
            pub = await socket_client(kit)
            for client in (slow, good, pub):
                await authed(kit, client)
            for client in (slow, good):
                assert (await client.call("subscribe", channel=CHANNEL))["ok"]

            published: list[str] = []
            received: list[dict[str, Any]] = []
            pad = "x" * 4000
            windows_after = 0
            while windows_after < EXTRA_WINDOWS:
                assert len(published) < MAX_EVENTS, "the slow client was never closed"
                published += await publish_window(pub, len(published), WINDOW, pad)
                received += await receive_events(good, WINDOW)
                if sample(metrics, "apix_slow_consumers_total"):
                    windows_after += 1

            # The good subscriber: every event, in publish order, no gaps.
            assert [event["data"]["n"] for event in received] == list(range(len(published)))
            assert event_ids(received) == published
            assert_increasing(published)

            # The slow one reads again: a prefix of the events, then 4009.
            frames = await slow.until_closed()
            assert slow.close_code == 4009
            seen = [frame["event"] for frame in frames if frame.get("push") == "event"]
            assert 0 < len(seen) < len(published)
            assert event_ids(seen) == published[: len(seen)]
            await wait_eof(slow)

            assert sample(metrics, "apix_slow_consumers_total") == 1
            assert sample(metrics, "apix_connection_closes_total", code="4009") == 1
            assert sample(metrics, "apix_connections") == 2
            assert kit.hub.router.statistics().subscriptions == 1
            # The survivors are unaffected.
            assert (await pub.call("ping"))["ok"]
            ids = await publish_window(pub, len(published), 1, "")
            assert event_ids(await receive_events(good, 1)) == ids
            await hang_up(good, pub)


async def test_outbox_bytes_limit_trips_before_the_item_count(tmp_path, monkeypatch):
    monkeypatch.setattr(gateway, "SEND_TIMEOUT", 120.0)
    outbox_bytes = 256 * 1024
    async with running_server(
        tmp_path,
        limits={"outbox_size": 1024, "outbox_bytes": outbox_bytes, "ops_per_second": 1e6},
    ) as kit:
        metrics = kit.hub.metrics
        with trio.fail_after(40):
            slow = await socket_client(kit, rcvbuf=4096)
            good = await socket_client(kit)
            pub = await socket_client(kit)
            slow_id = (await authed(kit, slow))["conn"]
            for client in (good, pub):
                await authed(kit, client)
            for client in (slow, good):
                assert (await client.call("subscribe", channel=CHANNEL))["ok"]
            slow_conn = kit.hub.registry.get(slow_id)
            assert slow_conn is not None

            pad = "y" * 60_000
            published: list[str] = []
            while not sample(metrics, "apix_slow_consumers_total"):
                assert len(published) < 200, "the byte limit never tripped"
                published += await publish_window(pub, len(published), 1, pad)
                assert event_ids(await receive_events(good, 1)) == published[-1:]

            # A handful of big events tripped it, far below the item limit.
            stats = slow_conn.outbox.statistics()
            assert len(published) < 1024
            assert stats.high_water_items < 100
            assert stats.high_water_bytes <= outbox_bytes
            assert stats.high_water_bytes + 60_000 > outbox_bytes

            frames = await slow.until_closed()
            assert slow.close_code == 4009
            seen = [frame["event"]["id"] for frame in frames if frame.get("push") == "event"]
            assert seen == published[: len(seen)]
            await wait_eof(slow)
            assert sample(metrics, "apix_connection_closes_total", code="4009") == 1
            await hang_up(good, pub)


# -- in memory, MockClock -----------------------------------------------------


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


class _Pipe:
    """One direction of a `pipe_pair`: a byte buffer of fixed capacity."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data = bytearray()
        self.writer_closed = False
        self.reader_closed = False
        self.changed = trio.lowlevel.ParkingLot()

    def wake(self) -> None:
        self.changed.unpark_all()


class PipeStream(trio.abc.Stream):
    """A TCP-like in-memory stream: `send_all` blocks while the peer's buffer
    (`capacity` bytes) is full and, when cancelled, leaves what it already
    wrote behind, as a socket does; closing one end gives the other EOF (or
    BrokenResourceError on write)."""

    def __init__(self, outgoing: _Pipe, incoming: _Pipe) -> None:
        self._out = outgoing
        self._in = incoming

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(bytes(data))
        await trio.lowlevel.checkpoint()
        while view:
            pipe = self._out
            if pipe.writer_closed:
                raise trio.ClosedResourceError
            if pipe.reader_closed:
                raise trio.BrokenResourceError
            room = pipe.capacity - len(pipe.data)
            if room > 0:
                pipe.data += view[:room]
                view = view[room:]
                pipe.wake()
            else:
                await pipe.changed.park()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        pipe = self._in
        await trio.lowlevel.checkpoint()
        while True:
            if pipe.reader_closed:
                raise trio.ClosedResourceError
            if pipe.data:
                size = len(pipe.data) if max_bytes is None else max_bytes
                chunk = bytes(pipe.data[:size])
                del pipe.data[:size]
                pipe.wake()
                return chunk
            if pipe.writer_closed:
                return b""
            await pipe.changed.park()

    async def aclose(self) -> None:
        self._out.writer_closed = True
        self._in.reader_closed = True
        self._out.wake()
        self._in.wake()
        await trio.lowlevel.checkpoint()


def pipe_pair(capacity: int) -> tuple[PipeStream, PipeStream]:
    """(client, server) streams; each direction buffers `capacity` bytes."""
    up, down = _Pipe(capacity), _Pipe(capacity)
    return PipeStream(up, down), PipeStream(down, up)


async def stalling_client(
    hub: Hub, nursery: trio.Nursery
) -> tuple[MemClient, trio.Event, list[float]]:
    """A client whose server writes block as soon as 16 bytes are unread.

    Returns the client, an event set when the server's handler returned, and
    a list that receives the trio time at which it did.
    """
    client_stream, server_stream = pipe_pair(16)
    done = trio.Event()
    finished: list[float] = []

    async def serve() -> None:
        await handle_stream(hub, server_stream)
        finished.append(trio.current_time())
        done.set()

    nursery.start_soon(serve)
    client = MemClient(client_stream)
    await client.handshake([])
    return client, done, finished


@pytest.mark.parametrize(
    ("limits", "pad", "trips_at"),
    [
        # 1 event stuck in the write + 8 queued; the 10th does not fit.
        ({"outbox_size": 8}, "", 10),
        # 1 stuck + 3 x ~30 KB queued; the 5th would pass 100 000 bytes.
        ({"outbox_size": 1000, "outbox_bytes": 100_000}, "z" * 30_000, 5),
    ],
    ids=["items", "bytes"],
)
async def test_exact_trip_point_and_stuck_write_deadline(
    tmp_path, autojump_clock, limits, pad, trips_at
):
    async with memory_hub(
        tmp_path,
        limits={**limits, "ops_per_second": 1e6},
        heartbeat={"interval": 1e6},
    ) as mem:
        metrics = mem.hub.metrics
        slow, done, finished = await stalling_client(mem.hub, mem.nursery)
        await authed(mem, slow)
        assert (await slow.call("subscribe", channel=CHANNEL))["ok"]
        pub = await mem.connect()
        await authed(mem, pub)

        stalled_at = trio.current_time()
        for n in range(trips_at):
            assert not sample(metrics, "apix_slow_consumers_total"), n
            reply = await pub.call("publish", channel=CHANNEL, data={"n": n, "pad": pad})
            assert reply["ok"]
        assert sample(metrics, "apix_slow_consumers_total") == 1
        assert trio.current_time() == stalled_at  # publishing never waited for it

        # The publisher keeps working while the server's write hangs.
        await trio.sleep(gateway.SEND_TIMEOUT / 2)
        assert (await pub.call("publish", channel=CHANNEL, data="later"))["ok"]
        assert not done.is_set()

        # The stuck write gives up at exactly its send timeout; the close frame
        # cannot follow it, so the connection is dropped at that instant.
        await done.wait()
        assert finished == [stalled_at + gateway.SEND_TIMEOUT]
        # The server just drops the connection: what the cut write had put in
        # the buffer still reaches the client, but no close frame follows it.
        rest = bytearray()
        while data := await slow.stream.receive_some(65536):
            rest += data
        slow.ws.receive_data(bytes(rest))
        assert not any(isinstance(event, CloseConnection) for event in slow.ws.events())
        assert sample(metrics, "apix_connection_closes_total", code="4009") == 1
        assert sample(metrics, "apix_connections") == 1
        assert mem.hub.router.statistics().subscriptions == 0
        assert (await pub.call("ping"))["ok"]


async def test_a_slow_but_steady_reader_gets_its_whole_replay(tmp_path, autojump_clock):
    history = 600
    channel = "big.replay"
    async with memory_hub(
        tmp_path,
        limits={"outbox_size": 16, "ops_per_second": 1e6},
        heartbeat={"interval": 1e6},
        namespaces=(Namespace("big.>", ChannelOptions(history_size=5000, history_ttl=3600)),),
    ) as mem:
        retention = mem.hub.namespaces.retention(channel)
        for n in range(history):
            await mem.hub.broker.publish(
                "acme", channel, str(n), sender="seed", key=None, retention=retention
            )
        async with trio.open_nursery() as nursery:
            client, _done, _finished = await stalling_client(mem.hub, nursery)
            await authed(mem, client)
            await client.send({"op": "subscribe", "id": 7, "channel": channel, "since": "0"})
            replayed = []
            while True:
                frame = await client.recv()
                assert frame is not None
                if frame.get("push") != "event":
                    break
                replayed.append(frame["event"]["data"])
                await trio.sleep(0.05)  # reads 20 frames a second, steadily
            assert frame == {
                "id": 7,
                "ok": True,
                "result": {
                    "channel": channel,
                    "position": frame.get("result", {}).get("position"),
                    "recovered": True,
                    "replayed": history,
                },
            }
            assert replayed == list(range(history))
            nursery.cancel_scope.cancel()
