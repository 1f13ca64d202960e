"""The Redis broker on a Redis Cluster (3 masters, 3 replicas, real processes).

- the bus shards land on every master, each in its own share of the slots,
  and our CRC16 agrees with the cluster's `CLUSTER KEYSLOT`;
- `broker.redis_mode = auto` picks the cluster on a cluster and the plain
  pipeline on a plain server;
- a slot moved to another master (resharding): the next call meets MOVED,
  follows it and succeeds; the bus reader of that shard follows too, and
  nothing is lost or doubled;
- a slot being migrated: a call for a key not on the source meets ASK and is
  sent to the target with ASKING; a publish, which would create several keys
  there mid-migration, meets TRYAGAIN and is resent until the migration is
  done.

These tests use the session's cluster (`shared_redis_cluster`); the ones that
move a slot move it back before they end.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from apix_trio.broker.model import Retention
from apix_trio.broker.redis.batch import ScriptBatcher
from apix_trio.broker.redis.cluster import ClusterScripts
from apix_trio.broker.redis.cluster_bus import ClusterBus
from apix_trio.broker.redis.events import RedisBroker, open_redis_broker
from apix_trio.broker.redis.keys import KeyLayout, hash_slot
from apix_trio.broker.sessions import SessionRecord
from apix_trio.protocol.event import Event
from apix_trio.settings import BrokerSettings, Settings
from tests.conftest import RedisServer
from tests.redis_topologies import RedisClusterSetup, command, wait_until

pytestmark = pytest.mark.timeout(120)

LONG = Retention(history_size=1000, history_ttl=3600.0, dedupe_window=600.0)
BOUND = 30.0


class Seen:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, Event]] = []
        self._grew = trio.Event()

    def __call__(self, org: str, channel: str, event: Event) -> None:
        self.events.append((org, channel, event))
        self._grew.set()
        self._grew = trio.Event()

    def of(self, channel: str) -> list[str]:
        return [event.id for _, c, event in self.events if c == channel]

    async def wait(self, channel: str, count: int) -> list[str]:
        while len(self.of(channel)) < count:
            await self._grew.wait()
        return self.of(channel)


@asynccontextmanager
async def cluster_broker(url: str, **broker: Any) -> AsyncIterator[tuple[RedisBroker, Seen]]:
    settings = Settings(
        broker=BrokerSettings(redis_url=url, key_prefix=f"t{uuid.uuid4().hex[:10]}", **broker)
    )
    seen = Seen()
    async with open_redis_broker(settings) as opened:
        opened.set_listener(seen)
        yield opened, seen


def channel_on_shard(layout: KeyLayout, shard: int, start: int = 0) -> str:
    return next(f"c{n}" for n in range(start, 100_000) if layout.shard_of("o", f"c{n}") == shard)


def owner_port(cluster: RedisClusterSetup, slot: int) -> int:
    for entry in command(cluster.master_ports()[0], "CLUSTER", "SLOTS"):  # type: ignore[union-attr]
        if entry[0] <= slot <= entry[1]:
            return int(entry[2][1])
    raise AssertionError(f"nobody serves slot {slot}")


def node_id(port: int) -> str:
    return str(command(port, "CLUSTER", "MYID"))


def move_slot(cluster: RedisClusterSetup, slot: int, source: int, target: int) -> None:
    """Reshard `slot` from master `source` to master `target`, keys included."""
    command(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", node_id(source))
    command(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", node_id(target))
    finish_migration(cluster, slot, source, target)


def finish_migration(cluster: RedisClusterSetup, slot: int, source: int, target: int) -> None:
    while True:
        keys = command(source, "CLUSTER", "GETKEYSINSLOT", str(slot), "100")
        assert isinstance(keys, list)
        if not keys:
            break
        reply = command(source, "MIGRATE", "127.0.0.1", str(target), "", "0", "5000", "KEYS", *keys)
        assert reply == "OK", reply
    for port in cluster.master_ports():
        command(port, "CLUSTER", "SETSLOT", str(slot), "NODE", node_id(target))
    wait_until(
        lambda: all(owner_seen_by(port, slot) == target for port in cluster.master_ports()),
        BOUND,
        f"every master to agree that {target} serves slot {slot}",
    )


def owner_seen_by(port: int, slot: int) -> int | None:
    for entry in command(port, "CLUSTER", "SLOTS"):  # type: ignore[union-attr]
        if entry[0] <= slot <= entry[1]:
            return int(entry[2][1])
    return None


# -- layout and detection ---------------------------------------------------------------


async def test_bus_shards_land_on_every_master(shared_redis_cluster: RedisClusterSetup) -> None:
    cluster = shared_redis_cluster
    layout = KeyLayout("apix", 16)
    for shard in range(16):
        key = layout.bus(shard)
        assert command(cluster.master_ports()[0], "CLUSTER", "KEYSLOT", key) == hash_slot(key)
    owners = {owner_port(cluster, layout.slot(shard)) for shard in range(16)}
    assert owners == set(cluster.master_ports())

    with trio.fail_after(BOUND):
        async with cluster_broker(cluster.url, redis_mode="cluster") as (broker, seen):
            assert isinstance(broker.scripts, ClusterScripts)
            assert isinstance(broker.bus, ClusterBus)
            assert {(r.address.port) for r in broker.bus.readers} == owners
            assert broker.ready
            channels = [channel_on_shard(layout, shard) for shard in range(16)]
            for channel in channels:
                await broker.publish("o", channel, "1", sender="s", key=None, retention=LONG)
            for channel in channels:
                assert len(await seen.wait(channel, 1)) == 1
            assert broker.statistics().bus.events >= 16


async def test_auto_mode_picks_cluster_or_standalone(
    shared_redis_cluster: RedisClusterSetup, redis_server: RedisServer
) -> None:
    with trio.fail_after(BOUND):
        async with cluster_broker(shared_redis_cluster.url) as (broker, _):
            assert isinstance(broker.scripts, ClusterScripts)
        async with cluster_broker(redis_server.url) as (broker, seen):
            assert type(broker.scripts) is ScriptBatcher
            published = await broker.publish("o", "x", "1", sender="s", key=None, retention=LONG)
            assert await seen.wait("x", 1) == [published.event.id]


# -- resharding ---------------------------------------------------------------------------


async def test_a_moved_slot_is_followed_by_calls_and_the_bus(
    shared_redis_cluster: RedisClusterSetup,
) -> None:
    cluster = shared_redis_cluster
    async with cluster_broker(cluster.url, redis_mode="cluster") as (broker, seen):
        layout = KeyLayout("apix", 16)  # the tags do not depend on the prefix
        channel = channel_on_shard(layout, 3)
        slot = layout.slot(3)
        source = owner_port(cluster, slot)
        target = next(port for port in cluster.master_ports() if port != source)
        scripts = broker.scripts
        assert isinstance(scripts, ClusterScripts)
        with trio.fail_after(BOUND):
            first = await broker.publish("o", channel, "1", sender="s", key="k1", retention=LONG)
            await seen.wait(channel, 1)
        try:
            await trio.to_thread.run_sync(move_slot, cluster, slot, source, target)
            with trio.fail_after(BOUND):
                second = await broker.publish(
                    "o", channel, "2", sender="s", key=None, retention=LONG
                )
                assert scripts.redirects >= 1  # MOVED, followed
                again = await broker.publish(
                    "o", channel, "1", sender="s", key="k1", retention=LONG
                )
                assert again.duplicate and again.event == first.event  # the keys moved along
                assert await seen.wait(channel, 2) == [first.event.id, second.event.id]
                page = await broker.read_after("o", channel, "0", 10, LONG)
                assert [e.id for e in page.events] == [first.event.id, second.event.id]
                assert page.recovered
                reader = broker.bus.readers[3]  # type: ignore[attr-defined]
                for _ in range(int(BOUND / 0.05)):  # the shard's reader follows the slot
                    if reader.address.port == target:
                        break
                    await trio.sleep(0.05)
                assert reader.address.port == target
        finally:
            await trio.to_thread.run_sync(move_slot, cluster, slot, target, source)
        with trio.fail_after(BOUND):
            third = await broker.publish("o", channel, "3", sender="s", key=None, retention=LONG)
            ids = await seen.wait(channel, 3)
            assert ids == [first.event.id, second.event.id, third.event.id]


async def test_calls_during_a_migration_follow_ask_and_wait_out_tryagain(
    shared_redis_cluster: RedisClusterSetup,
) -> None:
    cluster = shared_redis_cluster
    async with cluster_broker(cluster.url, redis_mode="cluster") as (broker, seen):
        layout = KeyLayout("apix", 16)
        slot = layout.slot(5)
        channel = channel_on_shard(layout, 5)
        source = owner_port(cluster, slot)
        target = next(port for port in cluster.master_ports() if port != source)
        scripts = broker.scripts
        assert isinstance(scripts, ClusterScripts)
        store = broker.sessions
        session = next(
            f"s{n}" for n in range(1_000_000) if hash_slot(store.key("o", f"s{n}")) == slot
        )
        command(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", node_id(source))
        command(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", node_id(target))
        try:
            with trio.fail_after(BOUND):
                # one key, not on the source: ASK, then ASKING + the call on the target
                record = SessionRecord(session, "alice", (), 1)
                assert command(target, "CLUSTER", "COUNTKEYSINSLOT", str(slot)) == 0
                assert await store.save("o", record, 60.0)
                assert scripts.redirects >= 1
                assert command(target, "CLUSTER", "COUNTKEYSINSLOT", str(slot)) == 1  # there
                assert await store.load("o", session) == record  # ASK again, then found
                # a publish would create several keys mid-migration: TRYAGAIN until it is done
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        trio.to_thread.run_sync, finish_after, cluster, slot, source, target
                    )
                    published = await broker.publish(
                        "o", channel, "1", sender="s", key=None, retention=LONG
                    )
                assert owner_seen_by(source, slot) == target
                assert await seen.wait(channel, 1) == [published.event.id]
        finally:
            await trio.to_thread.run_sync(finish_migration, cluster, slot, source, target)
            await trio.to_thread.run_sync(move_slot, cluster, slot, target, source)
        with trio.fail_after(BOUND):
            later = await broker.publish("o", channel, "2", sender="s", key=None, retention=LONG)
            page = await broker.read_after("o", channel, "0", 10, LONG)
            assert [e.id for e in page.events] == [published.event.id, later.event.id]
            assert await store.load("o", session) == record


def finish_after(cluster: RedisClusterSetup, slot: int, source: int, target: int) -> None:
    time.sleep(0.5)  # the publish meets TRYAGAIN meanwhile (and waits, resending)
    finish_migration(cluster, slot, source, target)


# -- a promoted replica that lacks the newest entries -------------------------------------


async def test_a_replica_missing_the_newest_events_answers_recovered_false(
    redis_server_factory: Any,
) -> None:
    """The `recovered` machinery after a failover to a replica that lagged:
    a client that saw events the new master lacks gets `recovered: false`
    (its `since` is past the new master's last id, or not an id there);
    new ids stay above anything a client could have seen only when the
    clock moved on (they are time-based)."""
    master = redis_server_factory()
    replica = redis_server_factory(args=("--replicaof", "127.0.0.1", str(master.port)))
    wait_until(lambda: info_up(replica.port), BOUND, "the replica to sync")
    prefix = f"t{uuid.uuid4().hex[:10]}"
    settings = Settings(broker=BrokerSettings(redis_url=master.url, key_prefix=prefix))
    with trio.fail_after(BOUND):
        async with open_redis_broker(settings) as broker:
            kept = [
                (await broker.publish("o", "c", f"{n}", sender="s", key=None, retention=LONG))
                for n in range(3)
            ]
            await trio.to_thread.run_sync(
                wait_until, lambda: replicated(master.port, replica.port), BOUND, "replication"
            )
            command(replica.port, "REPLICAOF", "NO", "ONE")  # it lags from here on
            lost = [
                (await broker.publish("o", "c", f"{n}", sender="s", key=None, retention=LONG))
                for n in range(3, 5)
            ]
        promoted = Settings(broker=BrokerSettings(redis_url=replica.url, key_prefix=prefix))
        async with open_redis_broker(promoted) as broker:
            for seen in lost:  # a client that saw an event the new master lacks
                page = await broker.read_after("o", "c", seen.event.id, 10, LONG)
                assert not page.recovered and page.events == ()
            last_kept = kept[-1].event.id
            page = await broker.read_after("o", "c", kept[0].event.id, 10, LONG)
            assert [e.id for e in page.events] == [p.event.id for p in kept[1:]]
            assert await broker.position("o", "c") == last_kept
            after = await broker.publish("o", "c", "new", sender="s", key=None, retention=LONG)
            assert after.event.id not in {p.event.id for p in lost}
            page = await broker.read_after("o", "c", lost[-1].event.id, 10, LONG)
            assert not page.recovered  # never an id of this stream: still false


def info_up(port: int) -> bool:
    text = str(command(port, "INFO", "replication"))
    return "master_link_status:up" in text


def replicated(master: int, replica: int) -> bool:
    def offset(port: int, field: str) -> int:
        for line in str(command(port, "INFO", "replication")).splitlines():
            if line.startswith(field + ":"):
                return int(line.split(":", 1)[1])
        return -1

    return offset(replica, "slave_repl_offset") >= offset(master, "master_repl_offset")
