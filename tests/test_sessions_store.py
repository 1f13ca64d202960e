"""The session store contract (apix_trio/broker/sessions.py), memory and Redis.

One suite, parametrised by `store_kind` over "memory", "redis" and
"redis-cluster" (the session's Redis Cluster, tests/brokers.py) (select a
side with `-k memory` / `-k redis`). The Redis side runs against a real
redis-server (tests/conftest.py) through `RedisBroker.sessions`; a fresh key
prefix isolates each test.

Time: the memory store runs on a fake wall clock the tests move; Redis expiry
runs on real time, so the one expiry test uses a short TTL and polls under
`trio.fail_after` on the Redis side (as the broker contract suite does).
Redis-only tests at the end check the key layout and TTL directly, the
recovery from a flushed script cache, and `BrokerUnavailable`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import attrs
import orjson
import pytest
import redis
import trio

from apix_trio.broker.memory.events import open_memory_broker
from apix_trio.broker.model import BrokerUnavailable
from apix_trio.broker.sessions import (
    SessionChannel,
    SessionRecord,
    SessionStore,
    decode_record,
    encode_record,
)
from apix_trio.settings import BrokerSettings, Settings
from tests.brokers import REDIS_KINDS, FakeWallClock, passes_within, redis_target
from tests.conftest import RedisServer

TTL = 300.0

pytestmark = pytest.mark.timeout(60)


@attrs.define
class Subject:
    store: SessionStore
    clock: FakeWallClock | None
    prefix: str = ""

    async def after(self, seconds: float, check: Callable[[], Awaitable[None]]) -> None:
        """Assert that `check` passes once `seconds` have gone by."""
        if self.clock is not None:
            self.clock.now += seconds
            await check()
            return
        await passes_within(seconds, check)


@pytest.fixture(params=["memory", *REDIS_KINDS])
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
            yield Subject(memory.sessions, clock)
        return
    from apix_trio.broker.redis.events import open_redis_broker

    url, extra = redis_target(store_kind, request)
    settings = redis_settings(url, **extra)
    async with open_redis_broker(settings) as broker:
        yield Subject(broker.sessions, None, settings.broker.key_prefix)


def record(session: str = "s1", sub: str = "alice", epoch: int = 0, n: int = 2) -> SessionRecord:
    channels = tuple(SessionChannel(f"chat.r{i}", f"{1000 + i}-{i}") for i in range(n))
    return SessionRecord(session, sub, channels, epoch)


# -- the contract ----------------------------------------------------------------


async def test_save_then_load_round_trips_every_field(subject: Subject) -> None:
    saved = SessionRecord(
        "Qm9x3kq7Zx0aUw2P",
        "alice@example.com",
        (
            SessionChannel("chat.room42", "1732550000123-0"),
            SessionChannel("jobs.render", "0-0", group="workers"),
            SessionChannel("chat.lobby", "1732550000999-7", presence=True),
        ),
        epoch=3,
        state=("doc.1", "cfg.team:blue"),
    )
    assert await subject.store.save("acme", saved, TTL) is True
    assert await subject.store.load("acme", saved.session) == saved


async def test_unknown_session_and_other_org_load_nothing(subject: Subject) -> None:
    assert await subject.store.load("acme", "nope") is None
    await subject.store.save("acme", record("s1"), TTL)
    assert await subject.store.load("globex", "s1") is None
    assert await subject.store.load("acme", "s2") is None


async def test_the_same_session_id_in_two_orgs_is_two_records(subject: Subject) -> None:
    await subject.store.save("acme", record("s1", sub="alice", n=1), TTL)
    await subject.store.save("globex", record("s1", sub="mallory", n=3), TTL)
    acme = await subject.store.load("acme", "s1")
    globex = await subject.store.load("globex", "s1")
    assert acme is not None and (acme.sub, len(acme.channels)) == ("alice", 1)
    assert globex is not None and (globex.sub, len(globex.channels)) == ("mallory", 3)


async def test_save_replaces_and_delete_forgets(subject: Subject) -> None:
    await subject.store.save("acme", record(n=2), TTL)
    await subject.store.save("acme", record(n=0), TTL)
    assert await subject.store.load("acme", "s1") == record(n=0)
    await subject.store.delete("acme", "s1")
    assert await subject.store.load("acme", "s1") is None
    await subject.store.delete("acme", "s1")  # absent: no error


async def test_a_lower_epoch_is_fenced_off(subject: Subject) -> None:
    assert await subject.store.save("acme", record(epoch=2, n=2), TTL) is True
    assert await subject.store.save("acme", record(epoch=1, n=5), TTL) is False
    assert await subject.store.load("acme", "s1") == record(epoch=2, n=2)
    assert await subject.store.save("acme", record(epoch=2, n=3), TTL) is True
    assert await subject.store.save("acme", record(epoch=3, n=1), TTL) is True
    assert await subject.store.load("acme", "s1") == record(epoch=3, n=1)


async def test_save_many_stores_every_record_but_fenced_ones(subject: Subject) -> None:
    await subject.store.save("acme", record("s7", epoch=9), TTL)
    items = [
        (org, record(f"s{i}", sub=f"u{i}", n=i % 4)) for i in range(600) for org in ("acme", "zeta")
    ]
    assert await subject.store.save_many(items, TTL) == len(items) - 1
    for org, saved in items[::37]:
        assert await subject.store.load(org, saved.session) == saved
    kept = await subject.store.load("acme", "s7")
    assert kept is not None and kept.epoch == 9
    assert await subject.store.save_many([], TTL) == 0


async def test_odd_session_ids_are_their_own_keys(subject: Subject) -> None:
    odd = ["a:b", "a", "a%3Ab", "*", "{x}", "s" * 128, "é/ü", "a b"]
    for n, session in enumerate(odd):
        await subject.store.save("acme", record(session, n=n % 3, epoch=n), TTL)
    for n, session in enumerate(odd):
        assert await subject.store.load("acme", session) == record(session, n=n % 3, epoch=n)


async def test_a_record_expires_ttl_after_its_last_save(subject: Subject) -> None:
    ttl = 0.5
    await subject.store.save("acme", record("short"), ttl)
    await subject.store.save("acme", record("long"), 3600)
    assert await subject.store.load("acme", "short") == record("short")

    async def gone() -> None:
        assert await subject.store.load("acme", "short") is None

    await subject.after(ttl, gone)
    assert await subject.store.load("acme", "long") == record("long")
    # Saving again starts a new lifetime.
    assert await subject.store.save("acme", record("short", n=1), ttl) is True
    assert await subject.store.load("acme", "short") == record("short", n=1)


async def test_memory_expiry_is_exact_and_saves_extend_it() -> None:
    clock = FakeWallClock()
    async with open_memory_broker(wall_clock=clock) as memory:
        store = memory.sessions
        await store.save("acme", record(), 10)
        clock.now += 9.999
        await store.save("acme", record(n=1), 10)  # extends to now + 10
        clock.now += 9.999
        assert await store.load("acme", "s1") == record(n=1)
        clock.now += 0.001
        assert await store.load("acme", "s1") is None


async def test_memory_store_forgets_expired_records_nobody_loads() -> None:
    clock = FakeWallClock()
    async with open_memory_broker(wall_clock=clock) as memory:
        store = memory.sessions
        await store.save_many([("acme", record(f"s{i}")) for i in range(200)], 1)
        for _ in range(3):  # keep-alive saves do not grow anything
            await store.save_many([("acme", record(f"s{i}")) for i in range(200)], 1)
        clock.now += 2
        for i in range(10):  # each save sweeps a batch of due records
            await store.save("acme", record(f"new{i}"), 3600)
        assert len(store) == 10


def test_record_codec_is_compact_and_rejects_garbage() -> None:
    saved = record(n=1)
    assert decode_record("s1", encode_record(saved)) == saved
    assert b"null" not in encode_record(saved) and b"false" not in encode_record(saved)
    for bad in (
        b"",
        b"[]",
        b'{"u": 1}',
        b'{"u":"a","e":"x","ch":[]}',
        b'{"u":"a","e":1,"ch":[{}]}',
        b'{"u":"a","e":1,"ch":[],"st":5}',
    ):
        assert decode_record("s1", bad) is None


def test_record_codec_keeps_state_keys_and_reads_records_without_them() -> None:
    saved = SessionRecord("s1", "alice", (), 2, state=("doc.1", "doc.2"))
    assert orjson.loads(encode_record(saved))["st"] == ["doc.1", "doc.2"]
    assert decode_record("s1", encode_record(saved)) == saved
    older = b'{"u":"alice","e":2,"ch":[]}'  # written before state subscriptions existed
    assert decode_record("s1", older) == SessionRecord("s1", "alice", (), 2)


# -- Redis only ------------------------------------------------------------------


def _sync_client(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url)


async def test_redis_key_layout_and_ttl(redis_server: RedisServer) -> None:
    from apix_trio.broker.redis.events import open_redis_broker

    settings = redis_settings(redis_server.url)
    prefix = settings.broker.key_prefix
    async with open_redis_broker(settings) as broker:
        await broker.sessions.save("acme", record("Qm9x", epoch=4), 120)
        await broker.sessions.save("acme", record("a:b"), 120)

    def inspect() -> tuple[bytes, int, dict[bytes, bytes], bool]:
        client = _sync_client(redis_server)
        key = f"{prefix}:acme:s:Qm9x"
        return (
            client.type(key),
            client.pttl(key),
            client.hgetall(key),
            bool(client.exists(f"{prefix}:acme:s:a%3Ab")),
        )

    kind, pttl, fields, escaped = await trio.to_thread.run_sync(inspect)
    assert kind == b"hash"
    assert 0 < pttl <= 120_000
    assert fields[b"e"] == b"4"
    assert decode_record("Qm9x", fields[b"r"]) == record("Qm9x", epoch=4)
    assert escaped


async def test_redis_store_survives_a_flushed_script_cache(redis_server: RedisServer) -> None:
    from apix_trio.broker.redis.events import open_redis_broker

    async with open_redis_broker(redis_settings(redis_server.url)) as broker:
        store = broker.sessions
        await store.save("acme", record(), TTL)
        await trio.to_thread.run_sync(lambda: _sync_client(redis_server).script_flush())
        assert await store.load("acme", "s1") == record()
        assert await store.save("acme", record(n=1), TTL) is True
        await store.delete("acme", "s1")
        assert await store.load("acme", "s1") is None


async def test_redis_store_down_raises_broker_unavailable(redis_server: RedisServer) -> None:
    from apix_trio.broker.redis.events import open_redis_broker

    settings = redis_settings(redis_server.url, operation_timeout=0.5)
    async with open_redis_broker(settings) as broker:
        store = broker.sessions
        await store.save("acme", record(), TTL)
        redis_server.kill()
        with trio.fail_after(5):
            with pytest.raises(BrokerUnavailable):
                await store.load("acme", "s1")
            with pytest.raises(BrokerUnavailable):
                await store.save_many([("acme", record(f"s{i}")) for i in range(5)], TTL)
