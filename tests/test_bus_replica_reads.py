"""The bus read from a replica (`publish_wait_replicas >= 1`), on real Redis.

A reader on a replica hands out only what reached the replica, which is
what survives the master's failover; the fault campaign (scripts/chaos.py)
found the alternative delivering a woken split-brain master's writes and
skipping the acknowledged writes of its successor. Here: every shard's
reader sits on a replica of its master on a real cluster, and behind
Sentinel the reader sits on the master's replica; a reader hands on only
what reached its replica (nothing while the replica is cut off from its
master, everything once it caught up, nothing twice), and one whose
master has no replica reads nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson
import pytest
import trio

from apix_trio.broker.redis.following import FollowingBusReader
from apix_trio.broker.redis.keys import KeyLayout
from apix_trio.broker.redis.resp import parse_url
from apix_trio.broker.redis.support import RedisTuning
from apix_trio.protocol.event import Event
from tests.conftest import RedisServerFactory, free_port
from tests.redis_topologies import (
    SENTINEL_MASTER,
    RedisClusterSetup,
    RedisSentinelSetup,
    command,
)
from tests.test_redis_cluster import LONG, channel_on_shard, cluster_broker, owner_port

pytestmark = pytest.mark.timeout(120)

BOUND = 30.0


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Poll `predicate` on the real clock (Redis replication is real), every
    20 ms for at most BOUND seconds."""
    for _ in range(int(BOUND / 0.02)):
        if predicate():
            return
        await trio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def test_every_cluster_shard_is_read_from_a_replica_of_its_master(
    shared_redis_cluster: RedisClusterSetup,
) -> None:
    cluster = shared_redis_cluster
    layout = KeyLayout("apix", 16)
    with trio.fail_after(BOUND):
        async with cluster_broker(cluster.url, redis_mode="cluster", publish_wait_replicas=1) as (
            broker,
            seen,
        ):
            readers = broker.bus.readers  # type: ignore[attr-defined]
            await until(lambda: all(r.reading_replica and r.ok for r in readers), "replicas")
            for shard, reader in enumerate(readers):
                assert reader.address.port == owner_port(cluster, layout.slot(shard))
            channels = [channel_on_shard(layout, shard) for shard in range(16)]
            published = []
            for channel in channels:
                result = await broker.publish(
                    "o", channel, "1", sender="s", key=None, retention=LONG
                )
                published.append(result.event.id)
            for channel, event_id in zip(channels, published, strict=True):
                assert await seen.wait(channel, 1) == [event_id]


def bus_entry(layout: KeyLayout, n: int) -> tuple[str, ...]:
    packed = orjson.dumps([str(n), "o", "c", f"{n}-0", str(n), "s", None, str(n)]).decode()
    return ("XADD", layout.bus(0), "*", "e", packed)


async def test_a_replicas_only_reader_hands_on_only_what_reached_its_replica(
    redis_server_factory: RedisServerFactory,
) -> None:
    master = redis_server_factory()
    replica = redis_server_factory(args=["--replicaof", "127.0.0.1", str(master.port)])
    lonely = redis_server_factory()  # a master without replicas
    layout = KeyLayout("apix", 1)
    seen: list[Event] = []
    on_master: list[Event] = []
    tuning = RedisTuning(bus_block_ms=200)
    reader = FollowingBusReader(
        parse_url(master.url), layout, 2.0, tuning, shards=[0], replicas_only=True
    )
    reader.listener = lambda org, channel, event: seen.append(event)
    refused = FollowingBusReader(
        parse_url(lonely.url), layout, 2.0, tuning, shards=[0], replicas_only=True
    )
    refused.listener = lambda org, channel, event: on_master.append(event)
    with trio.fail_after(BOUND):
        await until(lambda: command(replica.port, "ROLE")[3] == "connected", "the sync")  # type: ignore[index]
        async with trio.open_nursery() as nursery:
            await nursery.start(reader.serve)
            await nursery.start(refused.serve)
            await until(lambda: reader.reading_replica and reader.ok, "the replica")
            command(master.port, *bus_entry(layout, 1))
            command(lonely.port, *bus_entry(layout, 1))
            await until(lambda: len(seen) == 1, "entry 1")

            # the replica loses its master: what the master takes now is not on
            # the replica, so the reader (on the replica only) cannot hand it on
            command(replica.port, "REPLICAOF", "127.0.0.1", str(free_port()))
            command(master.port, *bus_entry(layout, 2))
            assert command(replica.port, "XLEN", layout.bus(0)) == 1
            assert [event.id for event in seen] == ["1-0"]

            command(replica.port, "REPLICAOF", "127.0.0.1", str(master.port))
            await until(lambda: len(seen) == 2, "entry 2, once the replica has it")

            # a replicas-only reader of a master without replicas reads nothing
            await until(lambda: refused.statistics().failures >= 2, "the refusals")
            assert not refused.ok and not refused.reading_replica
            nursery.cancel_scope.cancel()
    assert [event.id for event in seen] == ["1-0", "2-0"]  # nothing lost, nothing twice
    assert on_master == []


async def test_behind_sentinel_the_bus_is_read_from_the_masters_replica(
    redis_sentinel: RedisSentinelSetup,
) -> None:
    with trio.fail_after(BOUND):
        async with cluster_broker(
            redis_sentinel.url,
            redis_mode="sentinel",
            sentinel_master=SENTINEL_MASTER,
            publish_wait_replicas=1,
        ) as (broker, seen):
            reader = broker.bus
            assert isinstance(reader, FollowingBusReader)
            await until(lambda: reader.reading_replica and reader.ok, "the replica")
            assert reader.address.port == redis_sentinel.master.port
            result = await broker.publish("o", "c", "1", sender="s", key=None, retention=LONG)
            assert await seen.wait("c", 1) == [result.event.id]


async def test_a_replica_promoted_under_the_reader_is_not_read_past_its_promotion(
    redis_server_factory: RedisServerFactory,
) -> None:
    """The campaign's second split: the replica the reader sits on becomes a
    master (its own master failed); writes it takes then are on no replica,
    and were lost when it failed in turn. The reader hands none of them on
    until a replica of it holds them."""
    master = redis_server_factory()
    replica = redis_server_factory(args=["--replicaof", "127.0.0.1", str(master.port)])
    layout = KeyLayout("apix", 1)
    seen: list[Event] = []
    reader = FollowingBusReader(
        parse_url(master.url), layout, 2.0, RedisTuning(bus_block_ms=200), shards=[0],
        replicas_only=True,
    )  # fmt: skip
    reader.listener = lambda org, channel, event: seen.append(event)
    with trio.fail_after(BOUND):
        await until(lambda: command(replica.port, "ROLE")[3] == "connected", "the sync")  # type: ignore[index]
        async with trio.open_nursery() as nursery:
            await nursery.start(reader.serve)
            await until(lambda: reader.reading_replica and reader.ok, "the replica")
            command(master.port, *bus_entry(layout, 1))
            await until(lambda: len(seen) == 1, "entry 1")

            command(replica.port, "REPLICAOF", "NO", "ONE")  # promoted
            failures = reader.statistics().failures
            command(replica.port, *bus_entry(layout, 2))  # on no replica
            await until(lambda: reader.statistics().failures > failures, "the refusal")
            assert [event.id for event in seen] == ["1-0"]

            # the old master follows the promoted one; once it holds entry 2,
            # the reader (moved to the new master) reads it there
            command(master.port, "REPLICAOF", "127.0.0.1", str(replica.port))
            reader.retarget(parse_url(replica.url))
            await until(lambda: len(seen) == 2, "entry 2, once a replica has it")
            assert reader.reading_replica
            nursery.cancel_scope.cancel()
    assert [event.id for event in seen] == ["1-0", "2-0"]
