"""Contract of what the HTTP admin routes need of a broker, run against the
embedded broker and a real redis-server alike (`-k memory` / `-k redis`):

- `Broker.list_channels`: channels with retained history, by prefix, sorted,
  limited, per org; internal `$` channels never listed;
- `ConnectionDirectory` (`broker/directory.py`): records per org under node
  leases, filters, ordering and totals, lapsed leases, release;
- `ConsumerGroups.info` and the redrive cursor.

Time: the memory side runs on a fake wall clock (moved by the test); the
Redis side uses Redis' own clock, so expiry tests use sub-second TTLs and
poll (`passes_within`).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

import pytest
import trio

from apix_trio.broker.directory import ConnectionRecord, NodeLease
from apix_trio.broker.events import Broker
from apix_trio.broker.groups import Delivery
from apix_trio.broker.memory.events import open_memory_broker
from apix_trio.broker.model import Retention
from apix_trio.settings import BrokerSettings, Settings
from tests.brokers import FakeWallClock, passes_within

LONG = Retention(history_size=100, history_ttl=3600.0, dedupe_window=600.0)


@pytest.fixture(params=["memory", "redis"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clock(kind: str) -> FakeWallClock | None:
    return FakeWallClock() if kind == "memory" else None


@pytest.fixture
async def broker(
    kind: str, clock: FakeWallClock | None, request: pytest.FixtureRequest
) -> AsyncIterator[Broker]:
    opened: AbstractAsyncContextManager[Broker]
    if kind == "memory":
        assert clock is not None
        opened = open_memory_broker(wall_clock=clock)
    else:
        from apix_trio.broker.redis.events import open_redis_broker

        url = request.getfixturevalue("redis_url")
        prefix = f"apixtest-{uuid.uuid4().hex[:8]}"
        settings = Settings(broker=BrokerSettings(redis_url=url, key_prefix=prefix))
        opened = open_redis_broker(settings)
    async with opened as b:
        yield b


def org() -> str:
    return f"o{uuid.uuid4().hex[:10]}"


async def advance(clock: FakeWallClock | None, seconds: float) -> None:
    """Let `seconds` pass for the broker (fake clock moved, or real time slept)."""
    if clock is not None:
        clock.advance(seconds)
    else:
        await trio.sleep(seconds)


# -- list_channels -----------------------------------------------------------------


async def test_list_channels(broker: Broker) -> None:
    mine, theirs = org(), org()
    for channel in ("chat.b", "chat.a", "news.x", "user:al@x"):
        await broker.publish(mine, channel, "1", sender="a", key=None, retention=LONG)
    await broker.publish(theirs, "chat.z", "1", sender="a", key=None, retention=LONG)
    await broker.publish(mine, "$control", "{}", sender="a", key=None, retention=LONG)
    await broker.publish(
        mine, "gone.now", "1", sender="a", key=None, retention=Retention(history_size=0)
    )
    listed = await broker.list_channels(mine, "", 100)
    assert [c.channel for c in listed] == ["chat.a", "chat.b", "news.x", "user:al@x"]
    for info in listed:
        assert info.position == await broker.position(mine, info.channel)
    assert [c.channel for c in await broker.list_channels(mine, "chat.", 1)] == ["chat.a"]
    assert [c.channel for c in await broker.list_channels(mine, "user:", 10)] == ["user:al@x"]
    assert await broker.list_channels(mine, "nothing", 10) == []
    assert [c.channel for c in await broker.list_channels(theirs, "", 10)] == ["chat.z"]
    assert await broker.list_channels(org(), "", 10) == []


# -- the connection directory ----------------------------------------------------------


def rec(conn: str, sub: str, node: str, since: int) -> ConnectionRecord:
    return ConnectionRecord(conn, sub, node, since)


async def test_directory_records_filters_and_totals(broker: Broker) -> None:
    directory = broker.directory
    o = org()
    a, b = NodeLease("node-a"), NodeLease("node-b")
    await directory.add(o, a, [rec("c2", "bob", "node-a", 20), rec("c1", "ann", "node-a", 10)], 30)
    await directory.add(o, b, [rec("c3", "bob", "node-b", 15)], 30)
    await directory.add(org(), b, [rec("c9", "bob", "node-b", 1)], 30)
    listing = await directory.find(o)
    assert listing.total == 3
    assert [r.conn for r in listing.records] == ["c1", "c3", "c2"]
    assert listing.records[1] == rec("c3", "bob", "node-b", 15)
    bobs = await directory.find(o, sub="bob", limit=1)
    assert bobs.total == 2 and [r.conn for r in bobs.records] == ["c3"]
    assert (await directory.find(o, conn="c2")).records == (rec("c2", "bob", "node-a", 20),)
    assert (await directory.find(o, conn="c9")).total == 0  # another org's
    remote = await directory.find(o, exclude_node="node-a")
    assert [r.conn for r in remote.records] == ["c3"]
    assert (await directory.find(o, sub="bob", limit=0)).total == 2
    await directory.remove(o, ["c2", "unknown"])
    assert [r.conn for r in (await directory.find(o)).records] == ["c1", "c3"]


async def test_directory_lapsed_lease_drops_records(
    broker: Broker, clock: FakeWallClock | None
) -> None:
    directory = broker.directory
    o = org()
    alive, dying = NodeLease("alive"), NodeLease("dying")
    ttl = 0.6
    await directory.add(o, dying, [rec("d1", "bob", "dying", 1)], ttl)
    await directory.add(o, alive, [rec("a1", "bob", "alive", 2)], 30)
    assert (await directory.find(o)).total == 2
    assert await directory.refresh(o, dying, ttl) is True

    async def only_alive() -> None:
        assert [r.conn for r in (await directory.find(o)).records] == ["a1"]

    if clock is not None:
        clock.advance(ttl + 0.01)
        await only_alive()
    else:
        await passes_within(ttl, only_alive)
    # the lapsed node learns it, and registers again
    assert await directory.refresh(o, dying, 30) is False
    assert (await directory.find(o)).total == 1
    await directory.add(o, dying, [rec("d1", "bob", "dying", 1)], 30)
    assert (await directory.find(o)).total == 2


async def test_directory_new_incarnation_does_not_revive_old_records(broker: Broker) -> None:
    directory = broker.directory
    o = org()
    old, new = NodeLease("n1"), NodeLease("n1")
    assert old.member != new.member
    await directory.add(o, old, [rec("x1", "bob", "n1", 1)], 30)
    await directory.release(o, old)
    await directory.add(o, new, [rec("x2", "bob", "n1", 2)], 30)
    assert [r.conn for r in (await directory.find(o)).records] == ["x2"]


# -- consumer group info and the redrive cursor -------------------------------------------


async def test_group_info(broker: Broker) -> None:
    groups = broker.groups
    o = org()
    assert await groups.info(o, "jobs.a", "g") is None
    await broker.publish(o, "jobs.a", "0", sender="a", key=None, retention=LONG)
    await groups.join(o, "jobs.a", "g")
    info = await groups.info(o, "jobs.a", "g")
    assert info is not None and info.pending == 0
    for i in range(3):
        await broker.publish(o, "jobs.a", str(i), sender="a", key=None, retention=LONG)
    handed = await groups.read_new(o, "jobs.a", "g", [("n:c1", 2), ("n:c2", 2)])
    assert len(handed) == 3
    info = await groups.info(o, "jobs.a", "g")
    assert info is not None and info.pending == 3
    by_name = {c.name: c for c in info.consumers}
    assert by_name["n:c1"].pending == 2 and by_name["n:c2"].pending == 1
    assert all(0 <= c.idle < 5 for c in info.consumers)
    await groups.ack(o, "jobs.a", "g", [handed[0][1].event.id])
    info = await groups.info(o, "jobs.a", "g")
    assert info is not None and info.pending == 2
    assert await groups.info(o, "jobs.a", "other") is None
    assert await groups.info(org(), "jobs.a", "g") is None


async def test_group_info_counts_released_events(broker: Broker) -> None:
    groups = broker.groups
    o = org()
    await broker.publish(o, "jobs.b", "0", sender="a", key=None, retention=LONG)
    await groups.join(o, "jobs.b", "g")
    await broker.publish(o, "jobs.b", "1", sender="a", key=None, retention=LONG)
    [(_, delivery)] = await groups.read_new(o, "jobs.b", "g", [("n:c1", 5)])
    assert isinstance(delivery, Delivery)
    await groups.release(o, "jobs.b", "g", "n:c1")
    info = await groups.info(o, "jobs.b", "g")
    assert info is not None and info.pending == 1
    assert {c.name for c in info.consumers if c.pending} == {"apix.released"}


async def test_redrive_cursor_only_moves_forward(broker: Broker) -> None:
    groups = broker.groups
    o = org()
    assert await groups.redrive_cursor(o, "jobs.a", "g") == "0-0"
    assert await groups.advance_redrive_cursor(o, "jobs.a", "g", "100-2") == "100-2"
    assert await groups.advance_redrive_cursor(o, "jobs.a", "g", "99-9") == "100-2"
    assert await groups.advance_redrive_cursor(o, "jobs.a", "g", "100-1") == "100-2"
    assert await groups.advance_redrive_cursor(o, "jobs.a", "g", "100-10") == "100-10"
    assert await groups.redrive_cursor(o, "jobs.a", "g") == "100-10"
    assert await groups.redrive_cursor(o, "jobs.a", "h") == "0-0"
    assert await groups.redrive_cursor(org(), "jobs.a", "g") == "0-0"
