"""The op path of a connection: arrival order, and nothing waits behind a blocked op.

- publishes a client pipelines to one channel (sent back to back, no waiting
  for replies) are stored in the order it sent them, on both brokers, while
  other connections publish to the same channel at the same time;
- with the test's redis-server stopped (SIGSTOP), a connection's publish
  blocks; meanwhile its WebSocket pings are answered, the server's heartbeat
  pings and its pongs keep flowing (no 4008), and other connections' ops
  are answered at once.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import trio
from wsproto.events import Ping, Pong

from apix_trio.settings import ChannelOptions, Namespace
from tests.conftest import RedisServer
from tests.memws import MemClient
from tests.serverkit import Kit, running_server
from tests.test_slow_consumer import socket_client

pytestmark = pytest.mark.timeout(90)

CHANNEL = "orders.book"
COUNT = 150
WRITERS = 3


async def client_for(kit: Kit, sub: str) -> MemClient:
    client = await socket_client(kit)
    reply = await client.call("auth", token=kit.token(sub=sub))
    assert reply["ok"], reply
    return client


async def pipeline(client: MemClient, count: int, first_id: int = 1) -> list[dict[str, Any]]:
    """Send `count` publishes back to back, then read their replies."""
    for n in range(count):
        await client.send(
            {"op": "publish", "id": first_id + n, "channel": CHANNEL, "data": {"n": n}}
        )
    replies = []
    while len(replies) < count:
        frame = await client.recv()
        assert frame is not None, client.close_code
        if "id" in frame:
            replies.append(frame)
    return replies


@pytest.mark.parametrize("broker", ["memory", "redis"])
async def test_pipelined_publishes_are_stored_in_sending_order(
    tmp_path: Path, request: pytest.FixtureRequest, broker: str
) -> None:
    sections: dict[str, Any] = {
        "limits": {"ops_per_second": 1e6},
        "namespaces": (Namespace("orders.>", ChannelOptions(history_size=5000, history_ttl=600)),),
    }
    if broker == "redis":
        sections["broker"] = {"redis_url": request.getfixturevalue("redis_url")}
    async with running_server(tmp_path, **sections) as kit:
        with trio.fail_after(60):
            writers = [await client_for(kit, f"writer-{k}") for k in range(WRITERS)]
            results: dict[int, list[dict[str, Any]]] = {}

            async def write(k: int) -> None:
                results[k] = await pipeline(writers[k], COUNT)

            async with trio.open_nursery() as nursery:
                for k in range(WRITERS):
                    nursery.start_soon(write, k)
            hub = kit.hub
            page = await hub.broker.read_after(
                "acme", CHANNEL, "0", 10 * COUNT * WRITERS, hub.namespaces.retention(CHANNEL)
            )
    assert all(reply["ok"] for replies in results.values() for reply in replies)
    stored = [(event.sender, event.data) for event in page.events]
    assert len(stored) == COUNT * WRITERS
    for k in range(WRITERS):
        mine = [data for sender, data in stored if sender == f"writer-{k}"]
        assert mine == [f'{{"n":{n}}}' for n in range(COUNT)], f"writer-{k} out of order"
        # Replies came back in sending order too, with increasing ids.
        assert [reply["id"] for reply in results[k]] == list(range(1, COUNT + 1))
    # The writers really were interleaved in the stream.
    senders = [sender for sender, _ in stored]
    changes = sum(1 for a, b in itertools.pairwise(senders) if a != b)
    assert changes >= WRITERS


async def ws_ping(client: MemClient, payload: bytes) -> float:
    """Send a WebSocket ping; the seconds until its pong arrived."""
    sent = trio.current_time()
    await client.stream.send_all(client.ws.send(Ping(payload=payload)))
    while True:
        event = await client._next_event()
        if isinstance(event, Pong) and bytes(event.payload) == payload:
            return trio.current_time() - sent
        if isinstance(event, Ping):  # the server's heartbeat: answer it
            client.pings.append(trio.current_time())
            await client.stream.send_all(client.ws.send(event.response()))
        else:
            client._pending.append(event)


async def test_a_blocked_op_never_delays_pings_pongs_or_other_connections(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with running_server(
        tmp_path,
        broker={"redis_url": redis_server.url, "operation_timeout": 3.0},
        heartbeat={"interval": 0.5, "timeout": 0.4},
        limits={"ops_per_second": 1e6},
    ) as kit:
        with trio.fail_after(60):
            blocked = await client_for(kit, "blocked")
            other = await client_for(kit, "other")
            assert (await blocked.call("publish", channel=CHANNEL, data=0))["ok"]
            redis_server.pause()
            try:
                stalled_at = trio.current_time()
                await blocked.send({"op": "publish", "id": 50, "channel": CHANNEL, "data": 1})
                await trio.sleep(0.2)  # the publish is now waiting on Redis
                ping_delays = []
                op_delays = []
                for n in range(8):
                    ping_delays.append(await ws_ping(blocked, b"p%d" % n))
                    started = trio.current_time()
                    reply = await other.call("ping")
                    assert reply["ok"], reply
                    op_delays.append(trio.current_time() - started)
                    await trio.sleep(0.2)
                # The publish is still blocked: none of the above waited for it.
                assert trio.current_time() - stalled_at < 3.0 + 0.5
                frames = []
                while not frames:
                    frame = await blocked.recv()
                    assert frame is not None, blocked.close_code
                    if frame.get("id") == 50:
                        frames.append(frame)
                assert frames[0]["error"]["code"] == "unavailable"
            finally:
                redis_server.resume()
            # Heartbeats went both ways during the stall: no 4008.
            assert len(blocked.pings) >= 2
            assert blocked.close_code is None
            assert (await blocked.call("ping"))["ok"]
    assert max(ping_delays) < 0.3, ping_delays
    assert max(op_delays) < 0.3, op_delays
