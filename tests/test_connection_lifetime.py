"""A closed connection is freed by reference counting alone.

No reference cycle may outlive a connection: its objects (the connection,
its websocket, outbox, subscriptions, wsproto state) would otherwise wait
for the cyclic garbage collector, whose collections cost CPU in proportion
to the connection rate and hold the memory of closed connections meanwhile.
The test runs with the cyclic collector disabled and counts the live
objects of each kind: back to what they were once the connection's task
is done.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from wsproto.events import CloseConnection

from apix_trio.gateway.connection import Connection
from apix_trio.gateway.outbox import Outbox
from apix_trio.gateway.websocket import ServerWebSocket
from apix_trio.routing.subscriptions import ChannelSubscription
from tests.serverkit import running_server
from tests.test_slow_consumer import authed, socket_client, wait_eof

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


KINDS = (Connection, ServerWebSocket, Outbox, ChannelSubscription)


def live() -> Counter[str]:
    """Live objects of KINDS (the cyclic collector being off, objects held
    only by a cycle are still counted)."""
    return Counter(type(o).__name__ for o in gc.get_objects() if isinstance(o, KINDS))


@pytest.mark.parametrize("how", ["close_frame", "hang_up"])
async def test_a_closed_connection_leaves_no_reference_cycle(tmp_path, no_cyclic_gc, how):
    async with running_server(tmp_path, limits={"ops_per_second": 1e6}) as kit:
        with trio.fail_after(30):
            pub = await socket_client(kit)
            await authed(kit, pub)
            before = live()
            client = await socket_client(kit)
            conn_id = (await authed(kit, client))["conn"]
            assert (await client.call("subscribe", channel="life.a"))["ok"]
            assert (await pub.call("publish", channel="life.a", data=1))["ok"]
            frame = await client.recv()
            assert frame is not None and frame["event"]["data"] == 1
            assert live() - before == Counter(
                Connection=1, ServerWebSocket=1, Outbox=1, ChannelSubscription=1
            )
            del frame
            if how == "close_frame":
                await client.stream.send_all(client.ws.send(CloseConnection(code=1000)))
                await wait_eof(client)  # the server's close frame, then its close
            await client.stream.aclose()
            while kit.hub.registry.get(conn_id) is not None:
                await trio.testing.wait_all_tasks_blocked()
            await trio.testing.wait_all_tasks_blocked()
            assert live() == before
