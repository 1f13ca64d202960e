"""The trio-native Redis client and the pipeline on it, against real redis-servers.

- URLs: `redis://`, `rediss://`, `unix://` with login and database;
- a password-protected server on a unix socket with a non-zero database;
- calls issued in one tick are one batch (one round trip, INFO commandstats);
- batches are written without waiting for the previous replies (pipelined);
- acks of many members in one tick are one script call (`AckBatcher`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import redis
import trio
import trio.testing

from apix_trio.broker.model import BrokerUnavailable, Retention
from apix_trio.broker.redis.events import RedisTuning, open_redis_broker
from apix_trio.broker.redis.resp import RedisAddress, parse_url
from apix_trio.delivery.acks import AckBatcher, GroupKey
from apix_trio.settings import BrokerSettings, Settings
from tests.conftest import RedisServerFactory

LONG = Retention(history_size=10_000, history_ttl=3600.0, dedupe_window=600.0)


def settings(url: str) -> Settings:
    return Settings(broker=BrokerSettings(redis_url=url, key_prefix="apixpipe"))


def evalsha_calls(url: str) -> int:
    stats = redis.Redis.from_url(url).info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:7000/2", RedisAddress(port=7000, db=2)),
        ("redis://h", RedisAddress(host="h")),
        ("redis://:s%40cret@h:1", RedisAddress(host="h", port=1, password="s@cret")),
        ("redis://u:p@h/3", RedisAddress(host="h", username="u", password="p", db=3)),
        ("rediss://h:6380", RedisAddress(host="h", port=6380, tls=True)),
        (
            "rediss://h?ssl_cert_reqs=none&ssl_ca_certs=/ca.pem",
            RedisAddress(host="h", tls=True, tls_verify=False, tls_ca_file="/ca.pem"),
        ),
        ("unix:///run/r.sock", RedisAddress(path="/run/r.sock")),
        (
            "unix:///run/r.sock?db=4&password=x",
            RedisAddress(path="/run/r.sock", db=4, password="x"),
        ),
    ],
)
def test_urls(url: str, expected: RedisAddress) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize(
    "url", ["http://h", "redis://h:notaport", "redis://h/x", "unix://", "redis://h?db=-1"]
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ValueError):
        parse_url(url)


async def test_password_unix_socket_and_database(
    redis_server_factory: RedisServerFactory, tmp_path: Path
) -> None:
    sock = tmp_path / "r.sock"
    server = redis_server_factory(args=["--unixsocket", str(sock)])
    redis.Redis(host="127.0.0.1", port=server.port).config_set("requirepass", "pw")
    url = f"unix://{sock}?db=3&password=pw"
    with trio.fail_after(15):
        async with open_redis_broker(settings(url)) as broker:
            published = await broker.publish("o", "c", "1", sender="s", key=None, retention=LONG)
            assert (await broker.read_latest("o", "c", 1, LONG)).events == (published.event,)
        async with open_redis_broker(settings(f"unix://{sock}?db=3&password=wrong")) as broker:
            with pytest.raises(BrokerUnavailable, match="AUTH"):
                await broker.position("o", "c")
            assert not broker.ready
    inspect = redis.Redis(host="127.0.0.1", port=server.port, password="pw", db=3)
    assert inspect.dbsize() > 0
    assert redis.Redis(host="127.0.0.1", port=server.port, password="pw", db=0).dbsize() == 0


async def test_calls_issued_in_one_tick_are_one_round_trip(redis_url: str) -> None:
    with trio.fail_after(15):
        async with open_redis_broker(settings(redis_url)) as broker:
            await broker.position("o", "warm")  # connected
            before, calls_before = broker.statistics().batches, evalsha_calls(redis_url)
            positions: list[str] = []

            async def position(n: int) -> None:
                positions.append(await broker.position("o", f"c{n}"))

            async with trio.open_nursery() as nursery:
                for n in range(50):
                    nursery.start_soon(position, n)
            after = broker.statistics().batches
            assert positions == ["0-0"] * 50
            assert (after.batches - before.batches, after.calls - before.calls) == (1, 50)
            assert evalsha_calls(redis_url) - calls_before == 50


async def test_batches_do_not_wait_for_the_previous_replies(
    redis_server_factory: RedisServerFactory,
) -> None:
    """With Redis paused, every batch still goes out: after SIGCONT they are
    all answered from that one connection, in order."""
    server = redis_server_factory()
    tuning = RedisTuning(max_batch=4, batch_workers=16)  # room for health PINGs too
    with trio.fail_after(20):
        async with open_redis_broker(settings(server.url), tuning=tuning) as broker:
            await broker.position("o", "warm")
            server.pause()
            results: list[int] = []
            try:

                async def publish(n: int) -> None:
                    await broker.publish("o", "c", str(n), sender="s", key=None, retention=LONG)
                    results.append(n)

                async with trio.open_nursery() as nursery:
                    for n in range(32):  # 8 batches of 4
                        nursery.start_soon(publish, n)
                    # all written while Redis is stopped, none answered
                    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                    stalled = broker.scripts.statistics()
                    assert (stalled.queued, stalled.in_flight) == (0, 8)
                    assert results == []
                    server.resume()
            finally:
                server.resume()
            after = broker.statistics().batches
            assert sorted(results) == list(range(32))
            assert after.unavailable == 0
            page = await broker.read_after("o", "c", "0", 100, LONG)
            assert len(page.events) == 32


async def test_acks_of_one_tick_are_one_script_call(redis_url: str) -> None:
    key: GroupKey = ("o", "jobs", "w")
    with trio.fail_after(15):
        async with open_redis_broker(settings(redis_url)) as broker:
            groups = broker.groups
            await broker.publish("o", "jobs", "0", sender="s", key=None, retention=LONG)
            await groups.join(*key)
            ids = [
                (await broker.publish("o", "jobs", str(n), sender="s", key=None, retention=LONG))
                .event.id
                for n in range(20)
            ]
            consumers = [(f"n:{m}", 2) for m in range(10)]
            handed = await groups.read_new(*key, consumers)
            held: dict[str, list[str]] = {}
            for consumer, delivery in handed:
                held.setdefault(consumer, []).append(delivery.event.id)
            assert sorted(i for got in held.values() for i in got) == sorted(ids)

            seen: list[tuple[GroupKey, list[str], int]] = []
            acks = AckBatcher(lambda: groups, lambda k, i, n: seen.append((k, i, n)))
            counts: dict[str, int] = {}
            assert await groups.ack_many(*key, [[]]) == [0]  # the script is loaded
            calls_before = evalsha_calls(redis_url)
            batches_before = broker.statistics().batches.batches

            async def ack(consumer: str, batch: Sequence[str], spawn: object) -> None:
                counts[consumer] = await acks.ack(key, batch, spawn)  # type: ignore[arg-type]

            async with trio.open_nursery() as nursery:
                for consumer, batch in held.items():
                    # every member acks its own plus one of another (acked once only)
                    extra = held[consumers[0][0]][:1] if consumer != consumers[0][0] else []
                    nursery.start_soon(ack, consumer, [*batch, *extra], nursery.start_soon)
            assert acks.batches == 1
            assert evalsha_calls(redis_url) - calls_before == 1
            assert broker.statistics().batches.batches - batches_before == 1
            assert sum(counts.values()) == 20
            assert len(seen) == 1 and seen[0][0] == key and seen[0][2] == 20
            assert await groups.pending(*key) == []
