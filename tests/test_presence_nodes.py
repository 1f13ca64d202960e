"""Presence across real `apix-trio serve` processes on one real redis-server.

- joins and leaves (unsubscribe, close) made on one node are pushed to
  watchers on every node, once each, and `presence` agrees on every node;
- a node killed with SIGKILL (no goodbye) holding 50 members: every
  watcher on each surviving node gets exactly one `leave` per member within
  `presence.ttl` (2 s here; the survivors reap concurrently), and
  `presence` no longer lists them;
- the same channel name in two orgs: separate member sets, and in Redis
  each org's presence keys sit under its own `:<org>:` segment, reachable
  by that org's SCAN pattern only, crafted channel names included.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import redis
import trio

from apix_trio.broker.redis.keys import KeyLayout, escape
from tests.conftest import RedisServer
from tests.memws import MemClient
from tests.procs import NodeProcess, assert_clean_log, open_node

pytestmark = pytest.mark.timeout(120)

TTL = 2.0
SETTINGS = {
    "defaults.presence": True,
    "presence.ttl": TTL,
    "limits.ops_per_second": 100_000,
}
STEP = 30.0
MEMBERS = 50
PRESENCE_KIND = re.compile(r"^apix:\{b[0-9]+(\.[0-9]+)?\}:[^:]+:(p|po|pn|pu|pm):")


async def next_presence(client: MemClient) -> tuple[str, dict[str, Any]]:
    """(kind, member) of the next presence push (other frames are skipped)."""
    while True:
        frame = await client.recv()
        assert frame is not None, f"closed with {client.close_code}"
        if frame.get("push") == "presence":
            kind = "join" if "join" in frame else "leave"
            return kind, frame[kind]


async def watcher(node: NodeProcess, channel: str, sub: str) -> tuple[MemClient, str]:
    client = await node.connect(sub=sub)
    reply = await client.call("subscribe", channel=channel, presence=True)
    assert reply["ok"], reply
    members = reply["result"]["presence"]["members"]
    return client, members[-1]["conn"]


async def conn_of(client: MemClient) -> str:
    """The connection id (from a presence query on a channel nobody uses)."""
    reply = await client.call("subscribe", channel="whoami.x", presence=True)
    conn = str(reply["result"]["presence"]["members"][0]["conn"])
    assert (await client.call("unsubscribe", channel="whoami.x"))["ok"]
    return conn


async def test_joins_and_leaves_reach_watchers_on_every_node(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    key_dir = tmp_path / "keys"
    async with (
        open_node(key_dir, name="node-a", redis_url=redis_server.url, settings=SETTINGS) as a,
        open_node(key_dir, name="node-b", redis_url=redis_server.url, settings=SETTINGS) as b,
    ):
        with trio.fail_after(STEP):
            wa, wa_conn = await watcher(a, "chat.room", "wa")
            wb, wb_conn = await watcher(b, "chat.room", "wb")
            assert await next_presence(wa) == ("join", (await _member(b, wb_conn)))
            alice = await a.connect(sub="alice")
            bob = await b.connect(sub="bob")
            alice_conn, bob_conn = await conn_of(alice), await conn_of(bob)
            for client in (alice, bob):
                assert (await client.call("subscribe", channel="chat.room", presence=True))["ok"]
            for w in (wa, wb):
                assert [
                    (k, m["conn"]) for k, m in [await next_presence(w), await next_presence(w)]
                ] == [
                    ("join", alice_conn),
                    ("join", bob_conn),
                ]
            for node in (a, b):
                probe = await node.connect(sub="reader")
                query = (await probe.call("presence", channel="chat.room"))["result"]
                assert [m["conn"] for m in query["members"]] == [
                    wa_conn,
                    wb_conn,
                    alice_conn,
                    bob_conn,
                ]
                assert (query["total"], query["users"]) == (4, 4)
            assert (await alice.call("unsubscribe", channel="chat.room"))["ok"]
            await bob.stream.aclose()  # gone without a close frame
            for w in (wa, wb):
                got = [await next_presence(w), await next_presence(w)]
                assert [(k, m["conn"]) for k, m in got] == [
                    ("leave", alice_conn),
                    ("leave", bob_conn),
                ]
    assert_clean_log(a)
    assert_clean_log(b)


async def _member(node: NodeProcess, conn: str) -> dict[str, Any]:
    client = await node.connect(sub="lookup")
    query = (await client.call("presence", channel="chat.room"))["result"]
    (member,) = [m for m in query["members"] if m["conn"] == conn]
    await client.stream.aclose()
    return dict(member)


async def test_a_killed_node_s_members_leave_once_on_every_surviving_node_within_the_ttl(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    key_dir = tmp_path / "keys"
    url = redis_server.url
    async with (
        open_node(key_dir, name="node-a", redis_url=url, settings=SETTINGS) as a,
        open_node(key_dir, name="node-b", redis_url=url, settings=SETTINGS) as b,
        open_node(key_dir, name="node-c", redis_url=url, settings=SETTINGS) as c,
    ):
        with trio.fail_after(STEP):
            watchers = [await watcher(b, "chat.big", "wb"), await watcher(c, "chat.big", "wc")]
            survivors = {conn for _, conn in watchers}
            doomed: set[str] = set()
            members = []
            for i in range(MEMBERS):
                client = await a.connect(sub=f"user{i % 10}")
                reply = await client.call("subscribe", channel="chat.big", presence=True)
                assert reply["ok"], reply
                doomed.add(reply["result"]["presence"]["members"][-1]["conn"])
                members.append(client)
            for client, _ in watchers:
                seen = set()
                while not doomed <= seen:
                    kind, member = await next_presence(client)
                    if kind == "join":
                        seen.add(member["conn"])
            a.kill()
            killed_at = trio.current_time()
            await a.wait_exit(10)

            async def collect(client: MemClient, own: str, out: dict[str, float]) -> None:
                while set(out) != doomed:
                    kind, member = await next_presence(client)
                    assert kind == "leave" and member["conn"] in doomed, (kind, member)
                    assert member["conn"] not in out, f"second leave of {member['conn']}"
                    out[member["conn"]] = trio.current_time() - killed_at

            leaves: list[dict[str, float]] = [{}, {}]
            async with trio.open_nursery() as nursery:
                for (client, own), out in zip(watchers, leaves, strict=True):
                    nursery.start_soon(collect, client, own, out)
            latest = max(max(out.values()) for out in leaves)
            # Contract: within presence.ttl (2 s); a little slack for a
            # loaded test machine (the design bound is 5/6 ttl + a bus hop).
            assert latest <= TTL + 0.5, latest
            for node in (b, c):
                reader = await node.connect(sub="reader")
                query = (await reader.call("presence", channel="chat.big"))["result"]
                assert {m["conn"] for m in query["members"]} == survivors
                assert query["total"] == 2
            # Nothing late or doubled: the next push is a probe's join.
            probe = await b.connect(sub="probe")
            probe_conn = await conn_of(probe)
            assert (await probe.call("subscribe", channel="chat.big", presence=True))["ok"]
            for client, _ in watchers:
                kind, member = await next_presence(client)
                assert (kind, member["conn"]) == ("join", probe_conn)
    assert_clean_log(b)
    assert_clean_log(c)
    print(f"leaves after SIGKILL: last at {latest:.3f} s (ttl {TTL} s)")


ORG_A, ORG_B = "acme", "acme-x"
CRAFTED = ["chat.room", "chat.a:b@c-d", "chat.pm:x", "chat.p:acme-x:q", "acme-x:pm:chat"]


async def test_presence_of_two_orgs_never_mixes_in_pushes_or_keys(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    key_dir = tmp_path / "keys"
    async with open_node(
        key_dir, name="node-a", redis_url=redis_server.url, settings=SETTINGS
    ) as a:
        with trio.fail_after(STEP):
            joined: dict[str, dict[str, str]] = {ORG_A: {}, ORG_B: {}}
            clients = []
            for org in (ORG_A, ORG_B):
                for channel in CRAFTED:
                    client = await a.connect(org=org, sub=f"u-{org}")
                    reply = await client.call("subscribe", channel=channel, presence=True)
                    assert reply["ok"], reply
                    (member,) = reply["result"]["presence"]["members"]
                    joined[org][channel] = member["conn"]
                    clients.append(client)
            for org in (ORG_A, ORG_B):
                reader = await a.connect(org=org, sub="reader")
                for channel in CRAFTED:
                    query = (await reader.call("presence", channel=channel))["result"]
                    assert [m["conn"] for m in query["members"]] == [joined[org][channel]]
                    assert {m["sub"] for m in query["members"]} == {f"u-{org}"}
    keys, matched = await trio.to_thread.run_sync(_presence_keys, redis_server.url)
    layout = KeyLayout("apix", 16)
    presence_keys = {key for key in keys if PRESENCE_KIND.search(key)}
    for org in (ORG_A, ORG_B):
        own = set()
        for channel in CRAFTED:
            names = layout.presence(org, channel)
            own |= {names.members, names.order, names.nodes, names.users, names.meta}
            assert names.meta.endswith(f":{escape(org)}:pm:{escape(channel)}")
        # The node was killed with its members: all five keys of each channel
        # are there, found by the org's SCAN pattern, and nothing of the
        # other org is (`acme` is a prefix of `acme-x`).
        assert own <= presence_keys
        assert matched[org] & presence_keys == own
    assert presence_keys == matched[ORG_A] & presence_keys | matched[ORG_B] & presence_keys


def _presence_keys(url: str) -> tuple[dict[str, Any], dict[str, set[str]]]:
    """Every key, and what each org's SCAN pattern finds."""
    layout = KeyLayout("apix", 16)
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        keys: dict[str, Any] = {}
        for key in client.scan_iter(count=1000):
            keys[key] = client.type(key)
        matched = {
            org: set(client.scan_iter(match=layout.org_pattern(org), count=1000))
            for org in (ORG_A, ORG_B)
        }
        return keys, matched
    finally:
        client.close()
