"""Two real `apix-trio serve` processes on one real redis-server.

What the Redis broker promises across nodes, end to end, through the wire
protocol (no broker object in the test process); the first two tests also
run on the session's Redis Cluster (3 masters, `redis_mode = auto`):

- an event published on node B reaches a subscriber on node A once, in
  order, with the id the publisher was given, on several channels at once;
- `history` reads the same thing on both nodes; `subscribe` with `since` on
  one node replays exactly what was published on the other, then goes live;
- two orgs using the same channel names on two nodes never see each other's
  events, and in Redis itself every key of an org sits under that org's own
  `:<org>:` segment, with client-chosen names (`:`, `@`, `-` in channels;
  `:`, `{`, `}`, `*` in idempotency keys) escaped so they can neither leave
  the org's key space nor collide with each other.
"""

from __future__ import annotations

import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import trio

from apix_trio.broker.redis.keys import KeyLayout, escape
from apix_trio.delivery.canary import CANARY_ORG
from tests.brokers import REDIS_KINDS, redis_target
from tests.conftest import RedisServer
from tests.memws import MemClient
from tests.procs import NodeProcess, call_keeping, open_node

pytestmark = pytest.mark.timeout(120)

SETTINGS = {
    "defaults.history_size": 10_000,
    "limits.ops_per_second": 1_000_000,
}
WINDOW = 16
TEST_BOUND = 60.0

Item = tuple[str, Any, str | None]


@pytest.fixture(params=REDIS_KINDS)
def deployment(request: pytest.FixtureRequest) -> tuple[str, dict[str, object], str]:
    """`(redis_url, node settings, mode)`: a redis-server of the test's own, or
    the session's Redis Cluster (`redis_mode = auto` finds out which; a key
    prefix of the test's own keeps it apart from the other tests there)."""
    url, _ = redis_target(str(request.param), request)
    mode = "cluster" if request.param == "redis-cluster" else "standalone"
    return url, {**SETTINGS, "broker.key_prefix": f"t{uuid.uuid4().hex[:10]}"}, mode
"""channel, data, idempotency key"""


async def publish_all(client: MemClient, items: list[Item]) -> list[dict[str, Any]]:
    """Publish `items` in order, `WINDOW` in flight; the replies, in item order."""
    replies: list[dict[str, Any]] = []
    for start in range(0, len(items), WINDOW):
        chunk = items[start : start + WINDOW]
        base = 100_000 + start
        for offset, (channel, data, key) in enumerate(chunk):
            frame: dict[str, Any] = {
                "op": "publish",
                "id": base + offset,
                "channel": channel,
                "data": data,
            }
            if key is not None:
                frame["key"] = key
            await client.send(frame)
        got: dict[int, dict[str, Any]] = {}
        while len(got) < len(chunk):
            reply = await client.recv()
            assert reply is not None, f"publisher closed with {client.close_code}"
            if "push" not in reply:
                got[reply["id"]] = reply
        replies.extend(got[base + offset] for offset in range(len(chunk)))
    return replies


async def read_events(
    client: MemClient, into: dict[str, list[dict[str, Any]]], done: Callable[[], bool]
) -> None:
    """Append event pushes to `into[channel]` until `done()`."""
    while not done():
        frame = await client.recv()
        assert frame is not None, f"subscriber closed with {client.close_code}"
        if frame.get("push") == "event":
            into.setdefault(frame["channel"], []).append(frame["event"])


async def full_history(client: MemClient, channel: str) -> list[dict[str, Any]]:
    """Every retained event of `channel`, oldest first, a page of 1000 at a time."""
    events: list[dict[str, Any]] = []
    since = "0"
    for _ in range(100):  # bounded: far more pages than any test writes
        reply = await client.call("history", channel=channel, since=since, limit=1000)
        assert reply["ok"], reply
        page = reply["result"]["events"]
        events.extend(page)
        if len(page) < 1000:
            return events
        since = page[-1]["id"]
    raise AssertionError("history never ended")


async def assert_quiet(client: MemClient) -> None:
    """A ping round trip brings no further event (nothing doubled or stray)."""
    late: list[dict[str, Any]] = []
    reply = await call_keeping(client, "ping", late)
    assert reply["ok"], reply
    assert late == []


def assert_clean(*nodes: NodeProcess) -> None:
    for node in nodes:
        assert not node.problems(), node.problems()
        assert not node.tracebacks(), node.tracebacks()


# -- one org, two nodes ----------------------------------------------------------

CHANNELS = ("feed.one", "feed.two", "chat.room:1", "user.bob@x-y")
EVENTS = 400


async def test_events_cross_nodes_once_in_order_and_history_agrees(
    tmp_path: Path, deployment: tuple[str, dict[str, object], str]
) -> None:
    key_dir = tmp_path / "keys"
    url, settings, mode = deployment
    async with (
        open_node(key_dir, name="node-a", redis_url=url, settings=settings) as a,
        open_node(key_dir, name="node-b", redis_url=url, settings=settings) as b,
    ):
        with trio.fail_after(TEST_BOUND):
            for node in (a, b):  # broker.redis_mode = auto found out
                assert node.events("redis_mode_detected")[0]["mode"] == mode
            reader = await a.connect(sub="reader")
            for channel in CHANNELS:
                reply = await reader.call("subscribe", channel=channel)
                assert reply["ok"], reply
                assert reply["result"]["position"] == "0-0"
            writer = await b.connect(sub="writer")
            items: list[Item] = [
                (CHANNELS[n % len(CHANNELS)], {"n": n}, None) for n in range(EVENTS)
            ]
            replies = await publish_all(writer, items)

            acked: dict[str, list[dict[str, Any]]] = {channel: [] for channel in CHANNELS}
            for (channel, data, _), reply in zip(items, replies, strict=True):
                assert reply["ok"], reply
                assert reply["result"]["duplicate"] is False
                acked[channel].append({"id": reply["result"]["id"], "data": data})

            seen: dict[str, list[dict[str, Any]]] = {}
            await read_events(
                reader,
                seen,
                lambda: all(len(seen.get(c, ())) >= len(acked[c]) for c in CHANNELS),
            )
            await assert_quiet(reader)
            for channel in CHANNELS:
                got = seen[channel]
                assert [e["id"] for e in got] == [e["id"] for e in acked[channel]], channel
                assert [e["data"] for e in got] == [e["data"] for e in acked[channel]]
                assert {e["from"] for e in got} == {"writer"}
                assert all(e["ts"] == int(e["id"].split("-")[0]) for e in got)

            # The same history from both nodes, and it is what was delivered.
            history_reader = await b.connect(sub="historian")
            for channel in CHANNELS:
                on_a = await full_history(reader, channel)
                on_b = await full_history(history_reader, channel)
                assert on_a == on_b == seen[channel], channel
    assert_clean(a, b)


async def test_subscribe_since_on_one_node_replays_what_another_published(
    tmp_path: Path, deployment: tuple[str, dict[str, object], str]
) -> None:
    key_dir = tmp_path / "keys"
    url, settings, mode = deployment
    channel = "replay.x:1"
    async with (
        open_node(key_dir, name="node-a", redis_url=url, settings=settings) as a,
        open_node(key_dir, name="node-b", redis_url=url, settings=settings) as b,
    ):
        with trio.fail_after(TEST_BOUND):
            assert a.events("redis_mode_detected")[0]["mode"] == mode
            writer = await a.connect(sub="writer")
            replies = await publish_all(writer, [(channel, {"n": n}, None) for n in range(60)])
            ids = [reply["result"]["id"] for reply in replies]

            late = await b.connect(sub="late")
            replayed: list[dict[str, Any]] = []
            reply = await call_keeping(late, "subscribe", replayed, channel=channel, since=ids[19])
            assert reply["ok"], reply
            assert reply["result"] == {
                "channel": channel,
                "position": ids[-1],
                "recovered": True,
                "replayed": 40,
            }
            # Then live, with nothing missed or doubled at the seam.
            more = await publish_all(writer, [(channel, {"n": n}, None) for n in range(60, 65)])
            ids += [reply["result"]["id"] for reply in more]
            live: dict[str, list[dict[str, Any]]] = {
                channel: [push["event"] for push in replayed if push["push"] == "event"]
            }
            await read_events(late, live, lambda: len(live[channel]) >= 45)
            await assert_quiet(late)
            assert [e["id"] for e in live[channel]] == ids[20:]
            assert [e["data"]["n"] for e in live[channel]] == list(range(20, 65))

            everything: list[dict[str, Any]] = []
            fresh = await b.connect(sub="fresh")
            reply = await call_keeping(fresh, "subscribe", everything, channel=channel, since="0")
            assert reply["ok"], reply
            assert reply["result"]["replayed"] == 65
            assert reply["result"]["recovered"] is True
            assert [push["event"]["id"] for push in everything] == ids
    assert_clean(a, b)


# -- two orgs, two nodes -----------------------------------------------------------

ORG_A, ORG_B = "acme", "acme-x"  # one is a prefix of the other on purpose
TENANT_CHANNELS = ("chat.room:1", "user.bob@x-y", "a-b.c:d@e", "x", "x:k", "x.k")
KEYED: tuple[tuple[str, str], ...] = (
    ("x", "k:y"),  # stored as ...:k:x:k%3Ay
    ("x:k", "y"),  # stored as ...:k:x%3Ak:y, a different key
    ("chat.room:1", "a:{b}*"),
    ("user.bob@x-y", "{b0}"),
    ("a-b.c:d@e", "*:*"),
)
PER_CHANNEL = 12


def _have(seen: dict[str, list[Any]], want: dict[str, int]) -> Callable[[], bool]:
    return lambda: all(len(seen.get(channel, ())) >= n for channel, n in want.items())


def tenant_items(org: str) -> list[Item]:
    items: list[Item] = [
        (channel, {"org": org, "n": n}, None)
        for n in range(PER_CHANNEL)
        for channel in TENANT_CHANNELS
    ]
    items += [(channel, {"org": org, "key": key}, key) for channel, key in KEYED]
    return items


async def test_two_orgs_same_channel_names_nothing_crosses_nodes_or_keys(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    key_dir = tmp_path / "keys"
    async with (
        open_node(key_dir, name="node-a", redis_url=redis_server.url, settings=SETTINGS) as a,
        open_node(key_dir, name="node-b", redis_url=redis_server.url, settings=SETTINGS) as b,
    ):
        with trio.fail_after(TEST_BOUND):
            # Each org has a reader on both nodes; org A writes on node A,
            # org B on node B.
            readers: dict[tuple[str, str], MemClient] = {}
            for org in (ORG_A, ORG_B):
                for node in (a, b):
                    client = await node.connect(org=org, sub=f"reader-{node.name}")
                    for channel in TENANT_CHANNELS:
                        assert (await client.call("subscribe", channel=channel))["ok"]
                    readers[org, node.name] = client
            writers = {
                ORG_A: await a.connect(org=ORG_A, sub=f"w-{ORG_A}"),
                ORG_B: await b.connect(org=ORG_B, sub=f"w-{ORG_B}"),
            }

            acked: dict[str, dict[str, list[str]]] = {}
            keyed_ids: dict[str, dict[tuple[str, str], str]] = {}
            for org, writer in writers.items():
                items = tenant_items(org)
                replies = await publish_all(writer, items)
                acked[org] = {channel: [] for channel in TENANT_CHANNELS}
                keyed_ids[org] = {}
                for (channel, _, key), reply in zip(items, replies, strict=True):
                    assert reply["ok"], reply
                    assert reply["result"]["duplicate"] is False, (org, channel, key)
                    acked[org][channel].append(reply["result"]["id"])
                    if key is not None:
                        keyed_ids[org][channel, key] = reply["result"]["id"]
            # Same keys again: duplicates of the org's own first publish only.
            for org, writer in writers.items():
                again = await publish_all(
                    writer, [(channel, {"again": True}, key) for channel, key in KEYED]
                )
                for (channel, key), reply in zip(KEYED, again, strict=True):
                    assert reply["ok"], reply
                    assert reply["result"]["duplicate"] is True
                    assert reply["result"]["id"] == keyed_ids[org][channel, key]

            per_channel = PER_CHANNEL + 1  # channels with a keyed publish
            for (org, _), client in readers.items():
                seen: dict[str, list[dict[str, Any]]] = {}
                want = {channel: len(ids) for channel, ids in acked[org].items()}
                await read_events(client, seen, _have(seen, want))
                await assert_quiet(client)
                for channel in TENANT_CHANNELS:
                    events = seen[channel]
                    assert [e["id"] for e in events] == acked[org][channel]
                    assert {e["data"]["org"] for e in events} == {org}
                    assert len(events) in (PER_CHANNEL, per_channel)
                for channel in TENANT_CHANNELS:
                    history = await full_history(client, channel)
                    assert [e["id"] for e in history] == acked[org][channel]
                    assert {e["data"]["org"] for e in history} == {org}
    assert_clean(a, b)

    keys, matched = await trio.to_thread.run_sync(inspect_keys, redis_server.url)
    check_key_space(keys, matched, acked, keyed_ids)


def inspect_keys(url: str) -> tuple[dict[str, list[Any] | None], dict[str, set[str]]]:
    """Every key in Redis (with the entries of channel streams), and what
    SCAN MATCH `KeyLayout.org_pattern(org)` finds for each org."""
    layout = KeyLayout("apix", 16)
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        found: dict[str, list[Any] | None] = {}
        for key in client.scan_iter(count=1000):
            kind = client.type(key)
            if kind == "stream" and ":c:" in key:
                found[key] = client.xrange(key)
            elif kind == "hash" and ":k:" in key:
                found[key] = [client.hgetall(key)]
            else:
                found[key] = None
        matched = {
            org: set(client.scan_iter(match=layout.org_pattern(org), count=1000))
            for org in (ORG_A, ORG_B)
        }
        return found, matched
    finally:
        client.close()


def check_key_space(
    keys: dict[str, list[Any] | None],
    matched: dict[str, set[str]],
    acked: dict[str, dict[str, list[str]]],
    keyed_ids: dict[str, dict[tuple[str, str], str]],
) -> None:
    """Parse every key back into (org, kind, names): the layout is unambiguous,
    each org's keys name only its own channels and keys, and the streams of
    an org hold only that org's events."""
    layout = KeyLayout("apix", 16)
    by_org: dict[str, dict[str, set[tuple[str, ...]]]] = {
        org: {"c": set(), "m": set(), "k": set(), "s": set(), "audit": set(), "lat": set()}
        for org in (ORG_A, ORG_B)
    }
    canary_org = escape(CANARY_ORG)  # the delivery canary's own, outside every org
    shard_keys: dict[str, set[str]] = {ORG_A: set(), ORG_B: set()}
    for key, entries in keys.items():
        parts = key.split(":")
        assert parts[0] == "apix", key
        # Escaped parts hold no braces or glob characters: the only brace pair
        # is the shard tag, and it comes first.
        assert not set(key) & set("*?[]\\ "), key
        if parts[1] == "{presence}":  # node-level presence keys: the nodes' leases
            assert parts[2:] == ["nodes"] or parts[2] == "idx", key
            continue
        if parts[1] == "{o":  # the org's connection directory: apix:{o:<org>}:dir:<what>
            assert parts[2].endswith("}") and parts[3:] in (["dir", "conns"], ["dir", "nodes"]), key
            assert parts[2][:-1] in by_org, f"{key}: no such org"
            continue
        if parts[1].startswith("{"):
            assert parts[1][:2] == "{b" and parts[1][-1] == "}", key
            assert key.count("{") == key.count("}") == 1, key
            rest = parts[2:]
            if rest in (["bus"], ["bus", "seq"]):
                continue
            org, kind, *names = rest
            assert kind in ("c", "m", "k"), key
            assert len(names) == (2 if kind == "k" else 1), key
            if org == canary_org:
                assert kind in ("c", "m") and names[0].startswith("%24canary."), key
                continue
            shard_keys.setdefault(org, set()).add(key)
        else:  # apix:<org>:s:<session> (sessions), apix:<org>:audit, apix:<org>:lat
            assert "{" not in key and "}" not in key, key
            org, kind, *names = parts[1:]
            if kind == "s":
                assert len(names) == 1, key
            else:
                assert kind in ("audit", "lat") and not names, key
        assert org in by_org, f"{key}: no such org"
        decoded = tuple(urllib.parse.unquote(name, errors="strict") for name in names)
        assert tuple(escape(name) for name in decoded) == tuple(names), key
        by_org[org][kind].add(decoded)
        if kind == "c":
            assert entries is not None
            assert [entry_id for entry_id, _ in entries] == acked[org][decoded[0]], key
            for _, fields in entries:
                assert orjson.loads(fields["d"])["org"] == org, (key, fields)
                assert fields["f"] == f"w-{org}", (key, fields)
        if kind == "k":  # the idempotency record: the org's own first publish
            assert entries is not None
            record = entries[0]
            assert record["i"] == keyed_ids[org][decoded[0], decoded[1]], (key, record)
            assert orjson.loads(record["d"]) == {"org": org, "key": decoded[1]}, (key, record)
            assert record["f"] == f"w-{org}", (key, record)

    for org in (ORG_A, ORG_B):
        # Exactly the org's own channels, meta and idempotency records.
        assert by_org[org]["c"] == {(channel,) for channel in TENANT_CHANNELS}
        assert by_org[org]["m"] == {(channel,) for channel in TENANT_CHANNELS}
        assert by_org[org]["k"] == set(KEYED)
        assert len(by_org[org]["s"]) >= 2  # the readers' sessions (saved on subscribe)
        for channel, key in KEYED:
            assert layout.channel(org, channel).idempotency(key) in keys
            assert keyed_ids[org][channel, key] in acked[org][channel]
        # The operator's SCAN pattern for an org finds its channel keys and
        # none of the other org's (`acme` is a prefix of `acme-x`).
        assert matched[org] == shard_keys[org]
