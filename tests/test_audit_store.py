"""The audit trail store contract (apix_trio/broker/audit.py), memory and Redis.

One suite, parametrised by `store_kind` over "memory" and "redis" (select a
side with `-k memory` / `-k redis`). The Redis side runs against a real
redis-server (tests/conftest.py) through `RedisBroker.audit`; a fresh key
prefix isolates each test. Time: the memory store runs on a fake wall clock
the tests move (and, in the ttl test of its own, on trio's MockClock);
Redis retention runs on Redis' own clock, so its ttl test uses a short ttl
and polls under `trio.fail_after`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import pytest
import redis
import trio
import trio.testing

from apix_trio.broker.audit import (
    SCAN_BUDGET,
    AuditLog,
    AuditQuery,
    AuditRetention,
    BadAuditQuery,
    decode_entry,
    encode_body,
    parse_query,
)
from apix_trio.broker.memory.audit import MemoryAuditLog
from apix_trio.broker.memory.events import open_memory_broker
from apix_trio.broker.model import BrokerUnavailable
from apix_trio.observability.audit import AuditRecord
from apix_trio.protocol import ids
from apix_trio.settings import BrokerSettings, Settings
from tests.brokers import FakeWallClock, passes_within
from tests.conftest import RedisServer

pytestmark = pytest.mark.timeout(60)

KEEP = AuditRetention(max_entries=1000, ttl=3600)


@attrs.define
class Subject:
    log: AuditLog
    clock: FakeWallClock | None
    prefix: str = ""

    async def after(self, seconds: float, check: Callable[[], Awaitable[None]]) -> None:
        if self.clock is not None:
            self.clock.now += seconds
            await check()
            return
        await passes_within(seconds, check)


@pytest.fixture(params=["memory", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def redis_settings(url: str, **broker: object) -> Settings:
    prefix = f"apixtest-{uuid.uuid4().hex[:12]}"
    return Settings(broker=BrokerSettings(redis_url=url, key_prefix=prefix, **broker))  # type: ignore[arg-type]


@pytest.fixture
async def subject(store_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    if store_kind == "memory":
        clock = FakeWallClock()
        async with open_memory_broker(wall_clock=clock) as memory:
            yield Subject(memory.audit, clock)
        return
    from apix_trio.broker.redis.events import open_redis_broker

    settings = redis_settings(request.getfixturevalue("redis_url"))
    async with open_redis_broker(settings) as broker:
        yield Subject(broker.audit, None, settings.broker.key_prefix)


def rec(n: int, *, org: str = "acme", type: str = "auth.ok", sub: str = "alice") -> AuditRecord:
    return AuditRecord(
        org=org,
        ts=1_700_000_000_000 + n,
        type=type,
        sub=sub,
        conn=f"c{n}",
        node="node-1",
        ip="127.0.0.1",
        detail={"n": n},
    )


def numbers(entries: Any) -> list[int]:
    return [entry["detail"]["n"] for entry in entries]


# -- the contract ----------------------------------------------------------------


async def test_append_then_page_round_trips_every_field(subject: Subject) -> None:
    record = AuditRecord(
        org="acme",
        ts=1_732_550_000_123,
        type="connection.closed",
        sub="alice@example.com",
        conn="9f0c2a1b7d3e4f56",
        node="node-a",
        ip="10.1.2.3",
        detail={"code": 4009, "reason": "slow consumer", "nested": {"a": [1, "x"]}},
    )
    [entry_id] = await subject.log.append_many([record], KEEP)
    ids.parse_id(entry_id)
    page = await subject.log.page("acme", AuditQuery(), KEEP)
    assert page.as_json() == {
        "entries": [
            {
                "id": entry_id,
                "ts": 1_732_550_000_123,
                "type": "connection.closed",
                "sub": "alice@example.com",
                "conn": "9f0c2a1b7d3e4f56",
                "node": "node-a",
                "ip": "10.1.2.3",
                "detail": {"code": 4009, "reason": "slow consumer", "nested": {"a": [1, "x"]}},
            }
        ],
        "position": entry_id,
    }


async def test_ids_increase_and_orgs_are_separate(subject: Subject) -> None:
    stored = await subject.log.append_many(
        [rec(1), rec(2, org="globex"), rec(3), rec(4, org="globex")], KEEP
    )
    assert ids.parse_id(stored[0]) < ids.parse_id(stored[2])
    assert ids.parse_id(stored[1]) < ids.parse_id(stored[3])
    acme = await subject.log.page("acme", AuditQuery(), KEEP)
    globex = await subject.log.page("globex", AuditQuery(), KEEP)
    assert numbers(acme.entries) == [1, 3]
    assert numbers(globex.entries) == [2, 4]
    nobody = await subject.log.page("initech", AuditQuery(), KEEP)
    assert nobody.entries == () and nobody.position == "0-0"


async def test_paging_with_since_walks_the_whole_trail_oldest_first(subject: Subject) -> None:
    stored = await subject.log.append_many([rec(n) for n in range(25)], KEEP)
    seen: list[int] = []
    since = "0"
    for _ in range(10):
        page = await subject.log.page("acme", AuditQuery(since=since, limit=10), KEEP)
        if not page.entries:
            assert page.position == since
            break
        seen += numbers(page.entries)
        assert page.position == page.entries[-1]["id"]
        since = page.position
    assert seen == list(range(25))
    assert since == stored[-1]
    # since=0 means from the oldest kept; a since in the middle starts after it
    middle = await subject.log.page("acme", AuditQuery(since=stored[9], limit=3), KEEP)
    assert numbers(middle.entries) == [10, 11, 12]


async def test_without_since_the_newest_limit_oldest_first(subject: Subject) -> None:
    stored = await subject.log.append_many([rec(n) for n in range(12)], KEEP)
    page = await subject.log.page("acme", AuditQuery(limit=5), KEEP)
    assert numbers(page.entries) == [7, 8, 9, 10, 11]
    assert page.position == stored[-1]
    everything = await subject.log.page("acme", AuditQuery(limit=1000), KEEP)
    assert numbers(everything.entries) == list(range(12))


async def test_type_and_sub_filters(subject: Subject) -> None:
    await subject.log.append_many(
        [
            rec(0, type="auth.ok", sub="alice"),
            rec(1, type="auth.failed", sub="bob"),
            rec(2, type="admin.disconnect", sub="root"),
            rec(3, type="auth.ok", sub="bob"),
            rec(4, type="admin.redrive", sub="root"),
            rec(5, type="auth.failed", sub="alice"),
        ],
        KEEP,
    )
    by_type = await subject.log.page("acme", AuditQuery(type="auth.failed"), KEEP)
    assert numbers(by_type.entries) == [1, 5]
    by_sub = await subject.log.page("acme", AuditQuery(sub="bob"), KEEP)
    assert numbers(by_sub.entries) == [1, 3]
    both = await subject.log.page("acme", AuditQuery(type="auth.ok", sub="bob"), KEEP)
    assert numbers(both.entries) == [3]
    admin = await subject.log.page("acme", AuditQuery(type="admin.*"), KEEP)
    assert numbers(admin.entries) == [2, 4]
    none = await subject.log.page("acme", AuditQuery(type="state.changed"), KEEP)
    assert none.entries == ()


async def test_filtered_paging_reports_the_last_examined_entry(subject: Subject) -> None:
    stored = await subject.log.append_many(
        [rec(n, type="auth.failed" if n % 3 == 0 else "auth.ok") for n in range(10)], KEEP
    )
    first = await subject.log.page("acme", AuditQuery(since="0", limit=2, type="auth.failed"), KEEP)
    assert numbers(first.entries) == [0, 3]
    assert first.position == stored[3]
    rest = await subject.log.page(
        "acme", AuditQuery(since=first.position, limit=10, type="auth.failed"), KEEP
    )
    assert numbers(rest.entries) == [6, 9]
    assert rest.position == stored[9]
    tail = await subject.log.page(
        "acme", AuditQuery(since=stored[7], limit=10, type="state.changed"), KEEP
    )
    assert tail.entries == () and tail.position == stored[9]  # examined 8 and 9
    latest = await subject.log.page("acme", AuditQuery(limit=1, type="auth.failed"), KEEP)
    assert numbers(latest.entries) == [9] and latest.position == stored[9]


async def test_max_entries_trims_the_oldest(subject: Subject) -> None:
    small = AuditRetention(max_entries=100, ttl=3600)
    for start in range(0, 400, 50):
        await subject.log.append_many([rec(n) for n in range(start, start + 50)], small)
    page = await subject.log.page("acme", AuditQuery(since="0", limit=1000), small)
    kept = numbers(page.entries)
    # at least the newest 100; Redis' MAXLEN ~ may keep up to a stream node more
    assert kept[-100:] == list(range(300, 400))
    assert 100 <= len(kept) <= 200
    assert kept == list(range(400 - len(kept), 400))


async def test_entries_older_than_ttl_are_gone(subject: Subject) -> None:
    short = AuditRetention(max_entries=1000, ttl=1.0)
    await subject.log.append_many([rec(1), rec(2)], short)

    async def expired() -> None:
        page = await subject.log.page("acme", AuditQuery(since="0"), short)
        assert page.entries == ()

    assert len((await subject.log.page("acme", AuditQuery(since="0"), short)).entries) == 2
    await subject.after(1.5, expired)
    await subject.log.append_many([rec(3)], short)
    page = await subject.log.page("acme", AuditQuery(), short)
    assert numbers(page.entries) == [3]


# -- memory only: exact ttl on a MockClock --------------------------------------------


async def test_memory_ttl_is_exact_on_a_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    log = MemoryAuditLog(wall_clock=lambda: 1_800_000_000.0 + trio.current_time())
    retention = AuditRetention(max_entries=10, ttl=60.0)
    await log.append_many([rec(1)], retention)
    await trio.sleep(30)
    await log.append_many([rec(2)], retention)
    await trio.sleep(29.999)
    assert numbers((await log.page("acme", AuditQuery(), retention)).entries) == [1, 2]
    await trio.sleep(0.002)  # entry 1 is now 60.001 s old
    assert numbers((await log.page("acme", AuditQuery(), retention)).entries) == [2]
    await trio.sleep(30)
    assert (await log.page("acme", AuditQuery(since="0"), retention)).entries == ()


async def test_memory_filtered_page_stops_at_the_scan_budget() -> None:
    log = MemoryAuditLog(wall_clock=FakeWallClock())
    retention = AuditRetention(max_entries=SCAN_BUDGET + 100, ttl=3600)
    await log.append_many([rec(n) for n in range(SCAN_BUDGET + 10)], retention)
    page = await log.page("acme", AuditQuery(since="0", type="nothing"), retention)
    assert page.entries == ()
    nth = await log.page("acme", AuditQuery(since="0", limit=SCAN_BUDGET), retention)
    assert page.position == nth.position  # exactly SCAN_BUDGET examined


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


# -- query validation and the stored form ------------------------------------------


def test_parse_query_validates_and_defaults() -> None:
    assert parse_query() == AuditQuery(since=None, limit=100)
    assert parse_query(since="0", limit="5", type="auth.ok", sub="") == AuditQuery(
        since="0-0", limit=5, type="auth.ok"
    )
    assert parse_query(since="", limit="") == AuditQuery()
    for bad in ({"since": "x"}, {"since": "1-2-3"}, {"limit": "0"}, {"limit": "1001"}):
        with pytest.raises(BadAuditQuery):
            parse_query(**bad)  # type: ignore[arg-type]
    with pytest.raises(BadAuditQuery, match="limit"):
        parse_query(limit="ten")


def test_decode_entry_survives_a_garbled_body() -> None:
    record = rec(7)
    assert decode_entry("5-0", "auth.ok", "alice", encode_body(record)) == record.as_entry("5-0")
    garbled = decode_entry("5-0", "auth.ok", "alice", b"[not json")
    assert garbled["id"] == "5-0" and garbled["type"] == "auth.ok" and garbled["detail"] == {}


# -- Redis only ---------------------------------------------------------------------


def _sync_client(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url)


async def test_redis_key_layout_retention_and_escaping(redis_server: RedisServer) -> None:
    from apix_trio.broker.redis.events import open_redis_broker

    settings = redis_settings(redis_server.url)
    prefix = settings.broker.key_prefix
    async with open_redis_broker(settings) as broker:
        await broker.audit.append_many([rec(1), rec(2, org="$apix")], KEEP)

    def inspect() -> tuple[bytes, int, list[Any], bool]:
        client = _sync_client(redis_server)
        key = f"{prefix}:acme:audit"
        return (
            client.type(key),
            client.pttl(key),
            client.xrange(key),
            bool(client.exists(f"{prefix}:%24apix:audit")),
        )

    kind, pttl, entries, escaped = await trio.to_thread.run_sync(inspect)
    assert kind == b"stream"
    assert 3_500_000 < pttl <= 3_600_000
    [(_, fields)] = entries
    assert fields[b"t"] == b"auth.ok" and fields[b"u"] == b"alice"
    assert escaped


async def test_redis_audit_down_raises_broker_unavailable(redis_server: RedisServer) -> None:
    from apix_trio.broker.redis.events import open_redis_broker

    settings = redis_settings(redis_server.url, operation_timeout=0.5)
    async with open_redis_broker(settings) as broker:
        await broker.audit.append_many([rec(1)], KEEP)
        redis_server.kill()
        with trio.fail_after(5):
            with pytest.raises(BrokerUnavailable):
                await broker.audit.append_many([rec(2), rec(3, org="globex")], KEEP)
            with pytest.raises(BrokerUnavailable):
                await broker.audit.page("acme", AuditQuery(), KEEP)
