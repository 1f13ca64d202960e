"""The frame parser is made when the first bytes after the upgrade arrive.

Until then a connection has no wsproto parser (it costs ~1 KB per idle
connection): its pings and its close frame are built by a shared builder.
These tests check that a connection which has received nothing still
pings, takes the pong, and closes with a complete closing handshake (the
peer's answer to our close frame ends it at once, not after CLOSE_WAIT).
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from apix_trio.gateway.connection import CLOSE_WAIT
from apix_trio.protocol.codes import CloseCode
from tests.memws import memory_hub

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def connected_by_header(mem):
    """A client authenticated by its upgrade's Bearer header, its `connected`
    push read, and the server's connection, which has received no frame
    yet: it has no frame parser."""
    client = await mem.connect(headers=[(b"authorization", f"Bearer {mem.token()}".encode())])
    push = await client.recv()
    assert push is not None and push["push"] == "connected"
    await trio.testing.wait_all_tasks_blocked()
    conn = next(iter(mem.hub.registry))
    assert conn.ws._ws is None  # nothing received: no parser
    return client, conn


async def test_closed_before_the_first_frame_completes_the_handshake(tmp_path, autojump_clock):
    async with memory_hub(tmp_path, heartbeat={"interval": 1e6}) as mem:
        hub = mem.hub
        client, conn = await connected_by_header(mem)
        started = trio.current_time()
        conn.request_close(CloseCode.GOING_AWAY)
        del conn
        assert await client.recv() is None  # the close frame; the client answers it
        assert client.close_code == CloseCode.GOING_AWAY
        while len(hub.registry):
            await trio.testing.wait_all_tasks_blocked()
        # Ended by the peer's answer, not by giving up on it after CLOSE_WAIT.
        assert trio.current_time() - started < CLOSE_WAIT / 2


async def test_pings_before_the_first_frame(tmp_path, autojump_clock):
    async with memory_hub(tmp_path, heartbeat={"interval": 10.0, "timeout": 5.0}) as mem:
        client, conn = await connected_by_header(mem)
        # The first ping is built without a parser; the pong makes one.
        assert await client.recv(until=lambda: len(client.pings) >= 3) is None
        assert client.close_code is None
        assert conn.ws._ws is not None
        assert not conn.closing
        del conn
