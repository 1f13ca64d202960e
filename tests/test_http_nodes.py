"""The admin routes across real nodes: two `apix-trio serve` processes on one
redis-server. Disconnect by `sub` closes the user's sockets on both nodes
with 4030 within 2 s; `connections` lists both nodes' connections; a node
killed with SIGKILL has its connections leave the list within `presence.ttl`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from tests.brokers import passes_within
from tests.httpkit import http_request
from tests.memws import MemClient
from tests.procs import NodeProcess, assert_clean_log, open_node

TTL = 2.0
SETTINGS = {"presence.ttl": TTL}


def admin_token(node: NodeProcess, org: str = "acme") -> str:
    return node.token("ops", org=org, roles=("admin",))


async def connections(node: NodeProcess, org: str = "acme") -> dict[str, Any]:
    reply = await http_request(node.http_port, "GET", "/api/v1/connections",
                               token=admin_token(node, org))  # fmt: skip
    assert reply.status == 200, reply.body
    result: dict[str, Any] = reply.json()
    return result


async def eventually(check: Callable[[], Awaitable[None]], within: float = 5.0) -> None:
    await passes_within(within, check)


async def test_disconnect_and_connections_across_nodes(tmp_path: Path, redis_url: str) -> None:
    keys = tmp_path / "keys"
    async with (
        open_node(keys, name="node-a", redis_url=redis_url, settings=SETTINGS) as a,
        open_node(keys, name="node-b", redis_url=redis_url, settings=SETTINGS) as b,
    ):
        bob_a = await a.connect(sub="bob")
        bob_b = await b.connect(sub="bob")
        carol_b = await b.connect(sub="carol")
        other_org = await b.connect(org="globex", sub="bob")

        async def all_listed() -> None:
            listed = await connections(a)
            assert listed["total"] == 3
            seen = {(c["sub"], c["node"]) for c in listed["connections"]}
            assert seen == {("bob", "node-a"), ("bob", "node-b"), ("carol", "node-b")}

        await eventually(all_listed)
        started = trio.current_time()
        reply = await http_request(a.http_port, "POST", "/api/v1/disconnect",
                                   token=admin_token(a), json={"sub": "bob"})  # fmt: skip
        assert reply.json() == {"disconnected": 2}
        with trio.fail_after(2.0):
            for client in (bob_a, bob_b):
                await client.until_closed()
        assert trio.current_time() - started < 2.0
        assert bob_a.close_code == 4030 and bob_b.close_code == 4030
        assert (await carol_b.call("ping"))["ok"]
        assert (await other_org.call("ping"))["ok"]

        async def only_carol() -> None:
            listed = await connections(b)
            assert [(c["sub"], c["node"]) for c in listed["connections"]] == [("carol", "node-b")]

        await eventually(only_carol)
        for client in (carol_b, other_org):
            await client.stream.aclose()
        for node in (a, b):
            assert_clean_log(node)


async def test_killed_node_leaves_the_connection_list(tmp_path: Path, redis_url: str) -> None:
    keys = tmp_path / "keys"
    async with (
        open_node(keys, name="node-a", redis_url=redis_url, settings=SETTINGS) as a,
        open_node(keys, name="node-b", redis_url=redis_url, settings=SETTINGS) as b,
    ):
        clients: list[MemClient] = [await a.connect(sub="ann")]
        clients += [await b.connect(sub=f"u{i}") for i in range(3)]

        async def four() -> None:
            assert (await connections(a))["total"] == 4

        await eventually(four)
        b.kill()
        await b.wait_exit(5)
        killed_at = trio.current_time()

        async def only_a() -> None:
            listed = await connections(a)
            assert listed["total"] == 1
            assert [c["node"] for c in listed["connections"]] == ["node-a"]

        await passes_within(TTL, only_a)
        # TTL plus the time a request takes: the leases lapse within TTL of the last refresh
        assert trio.current_time() - killed_at <= TTL + 1.0
        await clients[0].stream.aclose()
        assert_clean_log(a)
