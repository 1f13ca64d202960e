"""Durable reads (`publish_wait_replicas >= 1`), on a real master and replica.

With `publish_wait_replicas = 1`, what a client reads (history, replay,
state) is what a replica holds too: a read never hands out data that a
failover can still discard. `WAIT` alone cannot promise that for data
another connection wrote (it counts the replication offset of the
connection's own last write), which is why a durable read is fenced
(batch.py). The replica is paused (SIGSTOP: connected, but acknowledging
nothing) while a second node stores a publish and a state write that no
replica acknowledges; the first node, whose own last write was
acknowledged, must refuse to read them until the replica has them.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio

from apix_trio.broker.model import BrokerUnavailable
from apix_trio.broker.redis.events import RedisBroker, open_redis_broker
from apix_trio.broker.state import StateLimits
from apix_trio.settings import BrokerSettings, Settings
from tests.conftest import RedisServerFactory
from tests.redis_topologies import command
from tests.test_bus_replica_reads import until
from tests.test_redis_cluster import LONG

pytestmark = pytest.mark.timeout(120)

BOUND = 30.0
TIMEOUT = 2.0


@asynccontextmanager
async def two_nodes(url: str) -> AsyncIterator[tuple[RedisBroker, RedisBroker]]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    settings = Settings(
        broker=BrokerSettings(
            redis_url=url, key_prefix=prefix, publish_wait_replicas=1, operation_timeout=TIMEOUT
        )
    )
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(open_redis_broker(settings))
        second = await stack.enter_async_context(open_redis_broker(settings))
        yield first, second


async def test_reads_show_only_what_a_replica_holds(
    redis_server_factory: RedisServerFactory,
) -> None:
    master = redis_server_factory()
    replica = redis_server_factory(args=["--replicaof", "127.0.0.1", str(master.port)])
    limits = StateLimits()
    with trio.fail_after(BOUND):
        await until(lambda: command(replica.port, "ROLE")[3] == "connected", "the sync")  # type: ignore[index]
        async with two_nodes(master.url) as (first, second):
            kept = await first.publish("o", "c", '"a"', sender="s", key=None, retention=LONG)
            await first.state.set("o", "k", "1", version=None, sender="s", limits=limits)
            assert (await first.state.get("o", "k")).version == 1  # its script loaded too

            replica.pause()  # connected, acknowledging nothing
            try:
                with pytest.raises(BrokerUnavailable, match="acknowledged the write"):
                    await second.publish("o", "c", '"b"', sender="s", key=None, retention=LONG)
                with pytest.raises(BrokerUnavailable, match="acknowledged the write"):
                    await second.state.set("o", "k", "2", version=1, sender="s", limits=limits)
                # both are stored on the master, on no replica: not readable
                with pytest.raises(BrokerUnavailable, match="hold what was read"):
                    await first.read_latest("o", "c", 10, LONG)
                with pytest.raises(BrokerUnavailable, match="hold what was read"):
                    await first.state.get("o", "k")
            finally:
                replica.resume()

            page = await first.read_latest("o", "c", 10, LONG)
            assert [event.data for event in page.events] == ['"a"', '"b"']
            assert page.events[0].id == kept.event.id
            assert (await first.state.get("o", "k")).version == 2


async def test_without_replicas_to_wait_for_reads_are_plain(
    redis_server_factory: RedisServerFactory,
) -> None:
    """`publish_wait_replicas = 0` (the default): no fence, no WAIT, nothing written."""
    server = redis_server_factory()
    settings = Settings(broker=BrokerSettings(redis_url=server.url, key_prefix="plain"))
    with trio.fail_after(BOUND):
        async with open_redis_broker(settings) as broker:
            await broker.publish("o", "c", '"a"', sender="s", key=None, retention=LONG)
            page = await broker.read_latest("o", "c", 10, LONG)
            assert [event.data for event in page.events] == ['"a"']
            assert command(server.port, "KEYS", "*fence*") == []
