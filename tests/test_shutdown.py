"""Graceful shutdown of a real `python -m apix_trio serve` process.

The server runs as a child process on free ports (`server.ws_port = 0`,
`server.http_port = 0`); the test learns them from the `listening` log line
and follows the server through its JSON log on stderr. The embedded broker
dies with the process, so "nothing acknowledged is lost" is checked as:
every publish that got a success reply before the close was delivered to
every subscriber, and no success reply came after the close.

The last test checks the mechanism behind the grace deadline in memory, on
a MockClock: a shielded write to a peer that stopped reading is cut at the
deadline instead of running to its send timeout.
"""

from __future__ import annotations

import signal
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from apix_trio.gateway import handshake as gateway
from apix_trio.protocol.codes import CloseCode
from tests.memws import MemClient, memory_hub
from tests.procs import NodeProcess, assert_clean_log, open_node, wait_exit_logged
from tests.test_slow_consumer import stalling_client

pytestmark = pytest.mark.timeout(60)

EXIT_MARGIN = 5.0  # process start-up aside, a clean exit takes well under a second
CHANNEL = "feed.live"


def server_process(tmp_path: Path, *, grace: float) -> AbstractAsyncContextManager[NodeProcess]:
    """`python -m apix_trio serve` on free ports; killed at exit if still running."""
    return open_node(tmp_path / "keys", settings={"server.shutdown_grace": grace})


async def read_until_closed(client: MemClient, into: list[dict[str, Any]]) -> None:
    while (frame := await client.recv()) is not None:
        into.append(frame)


# -- tests ---------------------------------------------------------------------


async def test_sigterm_mid_stream_closes_1001_and_loses_nothing_acknowledged(tmp_path):
    grace = 5.0
    async with server_process(tmp_path, grace=grace) as server:
        with trio.fail_after(30):
            subscribers = [await server.connect(sub=f"s{n}") for n in range(2)]
            for client in subscribers:
                assert (await client.call("subscribe", channel=CHANNEL))["ok"]
            publisher = await server.connect(sub="pub")
            received: list[list[dict[str, Any]]] = [[] for _ in subscribers]
            acked: list[str] = []
            publisher_frames: list[dict[str, Any]] = []
            async with trio.open_nursery() as nursery:
                for client, frames in zip(subscribers, received, strict=True):
                    nursery.start_soon(read_until_closed, client, frames)
                window, windows = 16, 200  # at most 3 200 publishes, bounded
                next_id = 1
                for number in range(windows):
                    for _ in range(window):
                        await publisher.send(
                            {"op": "publish", "id": next_id, "channel": CHANNEL, "data": next_id}
                        )
                        next_id += 1
                    if number == 3:
                        server.signal(signal.SIGTERM)  # with a window of publishes in flight
                    got = 0
                    while got < window and (frame := await publisher.recv()) is not None:
                        publisher_frames.append(frame)
                        got += 1
                    if publisher.close_code is not None:
                        break
                assert publisher.close_code is not None, "SIGTERM never closed the publisher"
                # Nothing at all follows the close frame: not in the read that
                # carried it, not later (so no reply after the close).
                assert not publisher._pending
                assert await publisher.stream.receive_some(65536) == b""
            code = await wait_exit_logged(server, grace + EXIT_MARGIN)

    assert code == 0
    assert publisher.close_code == CloseCode.GOING_AWAY
    assert [client.close_code for client in subscribers] == [CloseCode.GOING_AWAY] * 2
    # Every success reply (all came before the close frame, see above) is an
    # event every subscriber received, in order.
    for frame in publisher_frames:
        assert "push" not in frame
        if frame["ok"]:
            acked.append(frame["result"]["id"])
        else:  # the only acceptable failure while shutting down
            assert frame["error"]["code"] == "unavailable", frame
    assert len(acked) >= 3 * 16  # the windows before SIGTERM were all answered
    for frames in received:
        ids = [frame["event"]["id"] for frame in frames if frame.get("push") == "event"]
        assert ids[: len(acked)] == acked
        assert len(set(ids)) == len(ids)
    assert server.events("signal") == [server.events("signal")[0]]
    assert server.events("signal")[0]["signal"] == "SIGTERM"
    assert server.events("stopped")
    closes = server.events("close")
    assert sorted(line["code"] for line in closes) == [1001, 1001, 1001]
    assert_clean_log(server)


async def stall_a_subscriber(server: NodeProcess) -> MemClient:
    """A subscriber that stops reading while ~2 MB of events are queued for it.

    Its socket buffers hold a few kilobytes, so the server's write to it stays
    stuck; the outbox (1024 items, 4 MiB by default) does not overflow.
    """
    stalled = await server.connect(rcvbuf=4096, sub="stalled")
    assert (await stalled.call("subscribe", channel=CHANNEL))["ok"]
    publisher = await server.connect(sub="pub")
    pad = "p" * 50_000
    for n in range(40):
        reply = await publisher.call("publish", channel=CHANNEL, data={"n": n, "pad": pad})
        assert reply["ok"], reply
    await publisher.stream.aclose()
    return stalled


async def test_sigterm_exits_within_grace_even_with_a_stalled_client(tmp_path):
    grace = 1.0
    async with server_process(tmp_path, grace=grace) as server:
        with trio.fail_after(30):
            stalled = await stall_a_subscriber(server)
            watcher = await server.connect(sub="watcher")
            server.signal(signal.SIGTERM)
            # Without the grace deadline on socket writes, the stuck write would
            # hold the process for the whole send timeout (10 s).
            code = await wait_exit_logged(server, grace + EXIT_MARGIN)
            assert code == 0
            assert await watcher.recv() is None
            assert watcher.close_code == CloseCode.GOING_AWAY
            # The stalled client gets what was already in its socket, then EOF.
            while await stalled.stream.receive_some(65536):
                pass
    assert server.events("stopped")
    assert_clean_log(server)


async def test_second_sigterm_exits_promptly(tmp_path):
    grace = 30.0  # the first SIGTERM alone would wait for the stuck write
    async with server_process(tmp_path, grace=grace) as server:
        with trio.fail_after(30):
            stalled = await stall_a_subscriber(server)
            server.signal(signal.SIGTERM)
            await server.wait_log("shutting_down")
            assert server.process.returncode is None
            server.signal(signal.SIGTERM)
            code = await wait_exit_logged(server, EXIT_MARGIN)
            await stalled.stream.aclose()
    assert code == 0
    assert server.events("second_signal")
    assert_clean_log(server)


async def test_sigint_closes_1001_and_exits_0(tmp_path):
    grace = 5.0
    async with server_process(tmp_path, grace=grace) as server:
        with trio.fail_after(30):
            client = await server.connect()
            assert (await client.call("subscribe", channel=CHANNEL))["ok"]
            server.signal(signal.SIGINT)
            assert await client.recv() is None
            assert client.close_code == CloseCode.GOING_AWAY
            code = await wait_exit_logged(server, grace + EXIT_MARGIN)
    assert code == 0
    assert server.events("signal")[0]["signal"] == "SIGINT"
    assert_clean_log(server)


# -- the mechanism, in memory ----------------------------------------------------


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.mark.parametrize("grace", [1.0, 4.0])
async def test_drain_deadline_cuts_a_stuck_write(tmp_path, autojump_clock, grace):
    """What `serve` does on SIGTERM, against a peer that stopped reading."""
    assert grace < gateway.SEND_TIMEOUT
    async with memory_hub(
        tmp_path, heartbeat={"interval": 1e6}, limits={"ops_per_second": 1e6}
    ) as mem:
        async with trio.open_nursery() as connections:
            slow, done, finished = await stalling_client(mem.hub, connections)
            assert (await slow.call("auth", token=mem.token()))["ok"]
            assert (await slow.call("subscribe", channel=CHANNEL))["ok"]
            pub = await mem.connect()
            assert (await pub.call("auth", token=mem.token()))["ok"]
            assert (await pub.call("publish", channel=CHANNEL, data="x" * 1000))["ok"]
            await trio.testing.wait_all_tasks_blocked()  # the write to `slow` is stuck

            start = trio.current_time()
            deadline = start + grace
            for conn in mem.hub.registry:
                conn.request_close(CloseCode.GOING_AWAY)
                conn.ws.set_deadline(deadline)
            connections.cancel_scope.deadline = deadline
            await done.wait()
            assert finished == [deadline]
        assert pub.close_code is None or pub.close_code == CloseCode.GOING_AWAY
