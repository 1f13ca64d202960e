"""The presence contract (apix_trio/broker/presence.py), on memory and Redis.

One suite, parametrised by `broker_kind` over "memory" and "redis" (select a
side with `-k memory` / `-k redis`). The Redis side runs against a real
redis-server (tests/conftest.py) with a fresh key prefix per test; changes
reach the listener through the bus, so the suite waits for them
(`Changes.wait`), bounded by `fail_after`.

Time. Node leases are what reaping is about. The memory side runs on a
MockClock (autojump): `trio.sleep(LEASE + 0.5)` is instant and exact. The
Redis side uses Redis' own clock, so those tests really wait about a second.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from apix_trio.broker.events import Broker
from apix_trio.broker.memory.events import open_memory_broker
from apix_trio.broker.presence import JoinStatus, Leaver, presence_channel
from apix_trio.protocol.event import Event
from apix_trio.protocol.ids import parse_id
from apix_trio.settings import BrokerSettings, Settings

TIMEOUT = 20.0
LEASE = 0.6
"""Seconds of the node leases the reaping tests take."""
NODE_A, NODE_B = "node-a:1111", "node-b:2222"


class Changes:
    """The broker listener, keeping only presence changes: `(org, channel, kind,
    member, event)` with `channel` the client channel."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, str, dict[str, Any], Event]] = []
        self._grew = trio.Event()

    def __call__(self, org: str, channel: str, event: Event) -> None:
        prefix = presence_channel("")
        assert channel.startswith(prefix), channel
        change = orjson.loads(event.data)
        ((kind, member),) = change.items()
        self.items.append((org, channel[len(prefix) :], kind, member, event))
        self._grew.set()
        self._grew = trio.Event()

    def of(self, org: str, channel: str) -> list[tuple[str, str]]:
        """(kind, conn) of every change of (org, channel), in arrival order."""
        return [(k, m["conn"]) for o, c, k, m, _ in self.items if (o, c) == (org, channel)]

    async def wait(self, count: int) -> None:
        with trio.fail_after(TIMEOUT):
            while len(self.items) < count:
                await self._grew.wait()

    async def settle(self, broker_kind: str) -> None:
        """Memory: let every task run, so nothing more is on its way. Redis
        has no such barrier: the tests that assert "nothing was sent" make a
        later change of the same channel, which comes through the same bus
        shard after anything sent before it."""
        if broker_kind == "memory":
            await trio.testing.wait_all_tasks_blocked()


@pytest.fixture(params=["memory", "redis"])
def broker_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clock(broker_kind: str) -> trio.testing.MockClock | None:
    """pytest-trio runs the test on this clock when it is one (memory only)."""
    return trio.testing.MockClock(autojump_threshold=0) if broker_kind == "memory" else None


@pytest.fixture
def prefix() -> str:
    return f"apixtest-{uuid.uuid4().hex[:12]}"


def _open(
    kind: str, request: pytest.FixtureRequest, prefix: str
) -> AbstractAsyncContextManager[Broker]:
    if kind == "memory":
        return open_memory_broker()
    from apix_trio.broker.redis.events import open_redis_broker

    url = request.getfixturevalue("redis_url")
    return open_redis_broker(Settings(broker=BrokerSettings(redis_url=url, key_prefix=prefix)))


@pytest.fixture
async def broker(
    broker_kind: str,
    clock: trio.testing.MockClock | None,
    request: pytest.FixtureRequest,
    prefix: str,
) -> AsyncIterator[tuple[Broker, Changes]]:
    changes = Changes()
    async with _open(broker_kind, request, prefix) as opened:
        opened.set_listener(changes)
        yield opened, changes


@pytest.fixture
def org() -> str:
    return f"o{uuid.uuid4().hex[:10]}"


async def join(b: Broker, org: str, channel: str, conn: str, **kw: Any) -> JoinStatus:
    kw.setdefault("node", NODE_A)
    kw.setdefault("sub", "alice")
    kw.setdefault("info", None)
    kw.setdefault("max_members", 100)
    outcome = await b.presence.join(org, channel, conn=conn, **kw)
    return outcome.status


def conns(members: tuple[str, ...]) -> list[str]:
    return [orjson.loads(text)["conn"] for text in members]


async def test_join_announces_the_member_and_snapshots_show_it(broker, org):
    b, changes = broker
    outcome = await b.presence.join(
        org, "chat.a", node=NODE_A, conn="c1", sub="alice", info='{"name":"Al"}', max_members=10
    )
    assert outcome.status is JoinStatus.JOINED
    await changes.wait(1)
    o, channel, kind, member, event = changes.items[0]
    assert (o, channel, kind) == (org, "chat.a", "join")
    assert member["sub"] == "alice" and member["conn"] == "c1"
    assert member["info"] == {"name": "Al"}
    assert isinstance(member["since"], int) and member["since"] > 1_600_000_000_000
    assert (event.id, event.sender, event.key) == (outcome.position, "alice", "c1")
    assert event.ts == parse_id(event.id)[0]
    snapshot = await b.presence.members(org, "chat.a", 100)
    assert [orjson.loads(text) for text in snapshot.members] == [member]
    assert (snapshot.total, snapshot.users, snapshot.position) == (1, 1, outcome.position)


async def test_a_member_without_info_has_no_info_field(broker, org):
    b, _ = broker
    await join(b, org, "chat.a", "c1")
    (text,) = (await b.presence.members(org, "chat.a", 10)).members
    assert set(orjson.loads(text)) == {"sub", "conn", "since"}


async def test_joining_twice_is_one_member_and_one_join(broker, org, broker_kind):
    b, changes = broker
    assert await join(b, org, "chat.a", "c1") is JoinStatus.JOINED
    again = await b.presence.join(
        org, "chat.a", node=NODE_A, conn="c1", sub="alice", info=None, max_members=100
    )
    assert again.status is JoinStatus.ALREADY
    assert await join(b, org, "chat.a", "c2") is JoinStatus.JOINED
    await changes.wait(2)
    await changes.settle(broker_kind)
    assert changes.of(org, "chat.a") == [("join", "c1"), ("join", "c2")]
    snapshot = await b.presence.members(org, "chat.a", 10)
    assert conns(snapshot.members) == ["c1", "c2"] and snapshot.total == 2
    assert parse_id(again.position) < parse_id(snapshot.position)


async def test_leave_announces_once_and_only_for_members(broker, org, broker_kind):
    b, changes = broker
    await join(b, org, "chat.a", "c1")
    await join(b, org, "chat.a", "c2")
    left = await b.presence.leave(org, "chat.a", "c1")
    assert isinstance(left, Leaver) and left.node == NODE_A
    assert orjson.loads(left.member)["conn"] == "c1"
    assert await b.presence.leave(org, "chat.a", "c1") is None
    assert await b.presence.leave(org, "chat.a", "nobody") is None
    assert await b.presence.leave(org, "chat.zzz", "c1") is None
    await changes.wait(3)
    await join(b, org, "chat.a", "c3")  # a probe: everything before it has arrived
    await changes.wait(4)
    assert changes.of(org, "chat.a") == [
        ("join", "c1"),
        ("join", "c2"),
        ("leave", "c1"),
        ("join", "c3"),
    ]
    leave_member = changes.items[2][3]
    assert leave_member == orjson.loads(left.member)  # the member as it joined
    snapshot = await b.presence.members(org, "chat.a", 10)
    assert conns(snapshot.members) == ["c2", "c3"] and snapshot.total == 2


async def test_positions_increase_with_every_change_also_after_the_channel_empties(broker, org):
    b, changes = broker
    await join(b, org, "chat.a", "c1")
    await b.presence.leave(org, "chat.a", "c1")
    empty = await b.presence.members(org, "chat.a", 10)
    assert (empty.members, empty.total, empty.users) == ((), 0, 0)
    await join(b, org, "chat.a", "c1")
    await changes.wait(3)
    ids = [parse_id(event.id) for *_, event in changes.items]
    assert ids == sorted(set(ids)) and len(ids) == 3
    assert parse_id(empty.position) == ids[1]
    never = await b.presence.members(org, "chat.never", 10)
    assert (never.members, never.total, never.users, never.position) == ((), 0, 0, "0-0")


async def test_total_users_and_limit(broker, org):
    b, _ = broker
    await join(b, org, "chat.a", "c1", sub="alice")
    await join(b, org, "chat.a", "c2", sub="bob")
    await join(b, org, "chat.a", "c3", sub="alice")
    snapshot = await b.presence.members(org, "chat.a", 2)
    assert conns(snapshot.members) == ["c1", "c2"]
    assert (snapshot.total, snapshot.users) == (3, 2)
    await b.presence.leave(org, "chat.a", "c1")
    assert (await b.presence.members(org, "chat.a", 10)).users == 2
    await b.presence.leave(org, "chat.a", "c3")
    snapshot = await b.presence.members(org, "chat.a", 10)
    assert (conns(snapshot.members), snapshot.total, snapshot.users) == (["c2"], 1, 1)


async def test_max_members_is_enforced_at_the_join(broker, org, broker_kind):
    b, changes = broker
    assert await join(b, org, "chat.a", "c1", max_members=2) is JoinStatus.JOINED
    assert await join(b, org, "chat.a", "c2", max_members=2) is JoinStatus.JOINED
    assert await join(b, org, "chat.a", "c3", max_members=2) is JoinStatus.FULL
    assert await join(b, org, "chat.a", "c1", max_members=2) is JoinStatus.ALREADY
    await b.presence.leave(org, "chat.a", "c2")
    assert await join(b, org, "chat.a", "c3", max_members=2) is JoinStatus.JOINED
    await changes.wait(4)
    await changes.settle(broker_kind)
    assert changes.of(org, "chat.a") == [
        ("join", "c1"),
        ("join", "c2"),
        ("leave", "c2"),
        ("join", "c3"),
    ]
    assert (await b.presence.members(org, "chat.a", 10)).total == 2


async def test_concurrent_joins_never_exceed_max_members(broker, org):
    b, _ = broker
    statuses: list[JoinStatus] = []

    async def one(i: int) -> None:
        statuses.append(await join(b, org, "chat.a", f"c{i}", max_members=10))

    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(one, i)
    assert statuses.count(JoinStatus.JOINED) == 10
    assert statuses.count(JoinStatus.FULL) == 30
    assert (await b.presence.members(org, "chat.a", 100)).total == 10


async def test_the_same_channel_in_two_orgs_is_two_presences(broker, org, broker_kind):
    b, changes = broker
    other = org + "x"
    await join(b, org, "chat.a", "c1")
    await join(b, other, "chat.a", "c2", sub="mallory")
    assert conns((await b.presence.members(org, "chat.a", 10)).members) == ["c1"]
    assert conns((await b.presence.members(other, "chat.a", 10)).members) == ["c2"]
    assert await b.presence.leave(other, "chat.a", "c1") is None
    await changes.wait(2)
    await changes.settle(broker_kind)
    assert changes.of(org, "chat.a") == [("join", "c1")]
    assert changes.of(other, "chat.a") == [("join", "c2")]


# -- node leases and reaping --------------------------------------------------------


async def test_a_lease_is_refreshed_while_live_and_lost_once_expired(broker):
    b, _ = broker
    await b.presence.register_node(NODE_A, LEASE)
    assert await b.presence.refresh_node(NODE_A, LEASE)
    await trio.sleep(LEASE / 2)
    assert await b.presence.refresh_node(NODE_A, LEASE)
    await trio.sleep(LEASE / 2)
    assert await b.presence.refresh_node(NODE_A, LEASE)  # refreshed: still live
    await trio.sleep(LEASE + 0.3)
    assert not await b.presence.refresh_node(NODE_A, LEASE)
    assert not await b.presence.refresh_node("never-registered", LEASE)


async def test_members_of_an_expired_node_are_reaped_with_one_leave_each(broker, org, broker_kind):
    b, changes = broker
    await b.presence.register_node(NODE_A, LEASE)
    await b.presence.register_node(NODE_B, 60.0)
    for i in range(5):
        await join(b, org, "chat.a", f"a{i}", node=NODE_A)
        await join(b, org, "chat.b", f"a{i}", node=NODE_A)
    await join(b, org, "chat.a", "b0", node=NODE_B, sub="bob")
    assert await b.presence.reap() == []  # nobody expired yet
    await trio.sleep(LEASE + 0.3)
    reaped = await b.presence.reap()
    assert sorted(orjson.loads(leaver.member)["conn"] for leaver in reaped) == sorted(
        [f"a{i}" for i in range(5)] * 2
    )
    assert {leaver.node for leaver in reaped} == {NODE_A}
    assert await b.presence.reap() == []
    await changes.wait(21)
    await changes.settle(broker_kind)
    leaves = [conn for kind, conn in changes.of(org, "chat.a") if kind == "leave"]
    assert sorted(leaves) == [f"a{i}" for i in range(5)]
    snapshot = await b.presence.members(org, "chat.a", 10)
    assert conns(snapshot.members) == ["b0"] and snapshot.users == 1
    assert (await b.presence.members(org, "chat.b", 10)).total == 0


async def test_concurrent_reapers_write_every_leave_exactly_once(
    broker, org, broker_kind, request, prefix
):
    b, changes = broker
    await b.presence.register_node(NODE_A, LEASE)
    channels = [f"room.{i}" for i in range(10)]
    for channel in channels:
        for i in range(5):
            await join(b, org, channel, f"{channel}-c{i}", node=NODE_A)
    await changes.wait(50)
    await trio.sleep(LEASE + 0.3)
    async with _open(broker_kind, request, prefix) as second:
        reapers = [b, b, second, second] if broker_kind == "redis" else [b, b, b, b]
        results: list[list[Leaver]] = []

        async def reap(reaper: Broker) -> None:
            results.append(await reaper.presence.reap())

        async with trio.open_nursery() as nursery:
            for reaper in reapers:
                nursery.start_soon(reap, reaper)
    removed = sorted(orjson.loads(leaver.member)["conn"] for result in results for leaver in result)
    assert removed == sorted(f"{c}-c{i}" for c in channels for i in range(5))
    await changes.wait(100)
    probe = await join(b, org, "probe", "p", node=NODE_B)  # after every leave on the bus
    assert probe is JoinStatus.JOINED
    await changes.wait(101)
    leaves = [m["conn"] for _, _, kind, m, _ in changes.items if kind == "leave"]
    assert sorted(leaves) == removed
    for channel in channels:
        assert (await b.presence.members(org, channel, 10)).total == 0


async def test_a_member_joined_again_by_a_new_incarnation_is_not_reaped(broker, org, broker_kind):
    b, changes = broker
    await b.presence.register_node(NODE_A, LEASE)
    await b.presence.register_node(NODE_B, 60.0)
    await join(b, org, "chat.a", "c1", node=NODE_A)
    await join(b, org, "chat.a", "c2", node=NODE_A)
    assert await join(b, org, "chat.a", "c1", node=NODE_B) is JoinStatus.ALREADY
    await trio.sleep(LEASE + 0.3)
    reaped = await b.presence.reap()
    assert [orjson.loads(leaver.member)["conn"] for leaver in reaped] == ["c2"]
    await changes.wait(3)
    await changes.settle(broker_kind)
    assert changes.of(org, "chat.a") == [("join", "c1"), ("join", "c2"), ("leave", "c2")]
    assert conns((await b.presence.members(org, "chat.a", 10)).members) == ["c1"]


async def test_a_forgotten_node_is_not_reaped(broker, org):
    b, _ = broker
    await b.presence.register_node(NODE_A, LEASE)
    await join(b, org, "chat.a", "c1", node=NODE_A)
    await b.presence.leave(org, "chat.a", "c1")
    await b.presence.forget_node(NODE_A)
    await trio.sleep(LEASE + 0.3)
    assert await b.presence.reap() == []
    assert not await b.presence.refresh_node(NODE_A, LEASE)


async def test_a_large_channel_snapshots_every_member_in_join_order(broker, org):
    """More members than one Lua `unpack` takes at once (Redis reads them in
    steps of 4,000)."""
    b, _ = broker
    count = 4_500
    for start in range(0, count, 500):
        async with trio.open_nursery() as nursery:
            for i in range(start, start + 500):
                nursery.start_soon(
                    lambda i=i: join(b, org, "chat.big", f"c{i:05d}", max_members=10_000)
                )
    snapshot = await b.presence.members(org, "chat.big", 10_000)
    members = conns(snapshot.members)
    assert sorted(members) == [f"c{i:05d}" for i in range(count)]
    assert (snapshot.total, snapshot.users) == (count, 1)
    first = await b.presence.members(org, "chat.big", 3)
    assert conns(first.members) == members[:3]
