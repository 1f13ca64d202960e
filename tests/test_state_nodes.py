"""State across two real `apix-trio serve` processes on one real redis-server.

Through the wire protocol only (no broker object in the test process):

- a change made on node A reaches subscribers on A and on B, in version order;
- 1,000 changes to one key, made concurrently by clients on both nodes, get
  versions 1..1000, each version exactly once, and every subscriber on
  either node gets all of them in version order with no gap, each push
  carrying what the change that got that version sent;
- two orgs using the same state keys on both nodes never see each other's
  values, and in Redis itself every state key of an org sits in its own
  `:<org>:` segment (all in one slot), with crafted key names escaped so
  that they can neither leave the org's key space nor pose as its counter.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import trio

from apix_trio.broker.redis.keys import KeyLayout, escape
from tests.conftest import RedisServer
from tests.memws import MemClient
from tests.procs import NodeProcess, call_keeping, open_node

pytestmark = pytest.mark.timeout(120)

SETTINGS = {"limits.ops_per_second": 1_000_000}
TEST_BOUND = 60.0
CHANGES = 1000
WRITERS_PER_NODE = 2
WINDOW = 16
KEY = "doc.hot"


async def connect(node: NodeProcess, sub: str, org: str = "acme") -> MemClient:
    return await node.connect(node.token(sub, org=org, state=(">",)), org=org, sub=sub)


async def subscribe_state(client: MemClient, key: str) -> dict[str, Any]:
    pushes: list[dict[str, Any]] = []
    reply = await call_keeping(client, "state.subscribe", pushes, key=key)
    assert reply["ok"], reply
    assert pushes == []
    result: dict[str, Any] = reply["result"]
    return result


async def state_pushes(client: MemClient, count: int) -> list[dict[str, Any]]:
    pushes: list[dict[str, Any]] = []
    while len(pushes) < count:
        frame = await client.recv()
        assert frame is not None, f"subscriber closed with {client.close_code}"
        if frame.get("push") == "state":
            pushes.append(frame)
    return pushes


async def assert_quiet(client: MemClient) -> None:
    """A ping round trip brings no further push (nothing doubled or stray)."""
    late: list[dict[str, Any]] = []
    assert (await call_keeping(client, "ping", late))["ok"]
    assert late == []


def assert_clean(*nodes: NodeProcess) -> None:
    for node in nodes:
        assert not node.problems(), node.problems()
        assert not node.tracebacks(), node.tracebacks()


async def test_a_change_on_one_node_reaches_subscribers_on_both(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    key_dir = tmp_path / "keys"
    async with (
        open_node(key_dir, name="node-a", redis_url=redis_server.url, settings=SETTINGS) as a,
        open_node(key_dir, name="node-b", redis_url=redis_server.url, settings=SETTINGS) as b,
    ):
        with trio.fail_after(TEST_BOUND):
            on_a, on_b = await connect(a, "ann"), await connect(b, "ben")
            writer = await connect(a, "wes")
            for client in (on_a, on_b):
                assert await subscribe_state(client, "doc.1") == {"value": None, "version": 0}
            assert (await writer.call("state.set", key="doc.1", value={"t": "a"}))["ok"]
            assert (await writer.call("state.patch", key="doc.1", patch={"u": 1}))["ok"]
            assert (await writer.call("state.delete", key="doc.1"))["ok"]
            expected = [
                {"push": "state", "key": "doc.1", "version": 1, "value": {"t": "a"}},
                {"push": "state", "key": "doc.1", "version": 2, "patch": {"u": 1}},
                {"push": "state", "key": "doc.1", "version": 3, "value": None},
            ]
            for client in (on_a, on_b):
                assert await state_pushes(client, 3) == expected
                await assert_quiet(client)
            reply = await on_b.call("state.get", key="doc.1")
            assert reply["result"] == {"value": None, "version": 3}
    assert_clean(a, b)


async def write_changes(client: MemClient, first: int, count: int) -> dict[int, Any]:
    """`count` changes to KEY, WINDOW in flight: sets of `{"n": n}`, every
    fourth a patch `{"p": n}`. Returns version -> what was sent."""
    sent: dict[int, Any] = {}
    for start in range(first, first + count, WINDOW):
        frames: dict[int, dict[str, Any]] = {}
        for n in range(start, min(start + WINDOW, first + count)):
            if n % 4 == 0:
                frames[n] = {"op": "state.patch", "id": n, "key": KEY, "patch": {"p": n}}
            else:
                frames[n] = {"op": "state.set", "id": n, "key": KEY, "value": {"n": n}}
            await client.send(frames[n])
        for _ in frames:
            reply = await client.recv()
            assert reply is not None and reply.get("ok") is True, reply
            frame = frames[reply["id"]]
            change = {"patch": frame["patch"]} if "patch" in frame else {"value": frame["value"]}
            sent[reply["result"]["version"]] = change
    return sent


async def test_1000_concurrent_changes_from_both_nodes_arrive_gapless_everywhere(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    key_dir = tmp_path / "keys"
    async with (
        open_node(key_dir, name="node-a", redis_url=redis_server.url, settings=SETTINGS) as a,
        open_node(key_dir, name="node-b", redis_url=redis_server.url, settings=SETTINGS) as b,
    ):
        with trio.fail_after(TEST_BOUND):
            nodes = (a, b)
            readers = [await connect(node, f"reader{n}") for n, node in enumerate(nodes * 2)]
            for reader in readers:
                assert (await subscribe_state(reader, KEY))["version"] == 0
            writers = [
                await connect(node, f"writer{n}") for n, node in enumerate(nodes * WRITERS_PER_NODE)
            ]
            share = CHANGES // len(writers)
            sent: dict[int, Any] = {}
            received: list[list[dict[str, Any]]] = [[] for _ in readers]

            async def write(n: int, client: MemClient) -> None:
                got = await write_changes(client, n * share + 1, share)
                assert not set(got) & set(sent)
                sent.update(got)

            async def read(n: int, client: MemClient) -> None:
                received[n] = await state_pushes(client, CHANGES)

            async with trio.open_nursery() as nursery:
                for n, reader in enumerate(readers):
                    nursery.start_soon(read, n, reader)
                for n, writer in enumerate(writers):
                    nursery.start_soon(write, n, writer)

            assert sorted(sent) == list(range(1, CHANGES + 1))
            expected = [
                {"push": "state", "key": KEY, "version": v, **sent[v]} for v in sorted(sent)
            ]
            for pushes in received:
                assert pushes == expected
            for reader in readers:
                await assert_quiet(reader)
            final = (await readers[1].call("state.get", key=KEY))["result"]
            assert final["version"] == CHANGES
    assert_clean(a, b)


# -- tenants --------------------------------------------------------------------------

ORG_A, ORG_B = "acme", "acme-x"
CRAFTED = ("doc.1", "vn", "v:doc.1", "x:vn", "acme-x:v:doc.1", "@:v", "c:doc.1", "a.b:c-d@e_f")


async def test_orgs_with_the_same_keys_stay_apart_in_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    key_dir = tmp_path / "keys"
    async with (
        open_node(key_dir, name="node-a", redis_url=redis_server.url, settings=SETTINGS) as a,
        open_node(key_dir, name="node-b", redis_url=redis_server.url, settings=SETTINGS) as b,
    ):
        with trio.fail_after(TEST_BOUND):
            clients = {ORG_A: await connect(a, "w", ORG_A), ORG_B: await connect(b, "w", ORG_B)}
            watcher = await connect(b, "watch", ORG_A)
            assert (await subscribe_state(watcher, "doc.1"))["version"] == 0
            for org, client in clients.items():
                for n, key in enumerate(CRAFTED):
                    reply = await client.call("state.set", key=key, value={"org": org, "n": n})
                    assert reply["result"] == {"version": 1}, reply
            assert (await clients[ORG_B].call("state.delete", key="vn"))["ok"]
            for org, client in clients.items():
                for n, key in enumerate(CRAFTED):
                    got = (await client.call("state.get", key=key))["result"]
                    if (org, key) == (ORG_B, "vn"):
                        assert got == {"value": None, "version": 2}
                    else:
                        assert got == {"value": {"org": org, "n": n}, "version": 1}
            # The other org's change of the same key was never pushed here.
            assert await state_pushes(watcher, 1) == [
                {"push": "state", "key": "doc.1", "version": 1, "value": {"org": ORG_A, "n": 0}}
            ]
            await assert_quiet(watcher)
    assert_clean(a, b)
    found = await trio.to_thread.run_sync(inspect_state_keys, redis_server.url)
    check_state_keys(*found)


def inspect_state_keys(
    url: str,
) -> tuple[dict[str, dict[str, str] | str], dict[str, set[str]]]:
    """Every state key in Redis with its content, and what the operator's
    SCAN pattern finds per org."""
    layout = KeyLayout("apix", 16)
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        found: dict[str, dict[str, str] | str] = {}
        for key in client.scan_iter(count=1000):
            if ":v:" in key:
                found[key] = client.hgetall(key)
            elif key.endswith(":vn"):
                found[key] = str(client.get(key))
        matched = {
            org: {
                key
                for key in client.scan_iter(match=layout.org_pattern(org), count=1000)
                if ":v:" in key or key.endswith(":vn")
            }
            for org in (ORG_A, ORG_B)
        }
        return found, matched
    finally:
        client.close()


def check_state_keys(found: dict[str, dict[str, str] | str], matched: dict[str, set[str]]) -> None:
    layout = KeyLayout("apix", 16)
    values: dict[str, dict[str, dict[str, str]]] = {ORG_A: {}, ORG_B: {}}
    counters: dict[str, str] = {}
    for key, content in found.items():
        parts = key.split(":")
        assert parts[0] == "apix" and parts[1].startswith("{b"), key
        assert key.count("{") == key.count("}") == 1, key
        org = parts[2]
        assert org in values, f"{key}: no such org"
        # All of an org's state sits in the slot of its `$state` shard.
        assert f"apix:{parts[1]}" == layout.tag(layout.state(org).shard), key
        if parts[3] == "vn":
            assert len(parts) == 4, key
            assert isinstance(content, str)
            counters[org] = content
            continue
        assert parts[3] == "v" and len(parts) == 5, key
        name = urllib.parse.unquote(parts[4], errors="strict")
        assert escape(name) == parts[4], key
        assert isinstance(content, dict)
        values[org][name] = content
    for org in (ORG_A, ORG_B):
        assert set(values[org]) == set(CRAFTED)
        for n, name in enumerate(CRAFTED):
            stored = values[org][name]
            if (org, name) == (ORG_B, "vn"):
                assert stored == {"n": "2", "v": "null"}
            else:
                assert stored["n"] == "1"
                assert orjson.loads(stored["v"]) == {"org": org, "n": n}
        with_value = sum(1 for stored in values[org].values() if stored["v"] != "null")
        assert counters[org] == str(with_value)
        # The operator's SCAN pattern finds the org's state keys and none
        # of the other org's (`acme` is a prefix of `acme-x`).
        own = {key for key in found if key.split(":")[2] == org}
        assert matched[org] == own
