"""The fan-out bus on a Redis Cluster: every shard read from the master owning it.

Theory of operation
-------------------
On one server a node reads every bus shard with one XREAD (bus.py). On a
cluster that is impossible: the shards live in different hash slots
(spread over the masters on purpose, `keys.shard_tags`) and Redis Cluster
refuses any multi-key command whose keys are in different slots
(CROSSSLOT), even when one master owns them all. So `ClusterBus` runs one
`FollowingBusReader` per shard, each with one blocking XREAD at a time on a
connection to the master owning the shard's slot; with 16 shards and 3
masters a node holds ~5 connections per master, each costing one XREAD per
`bus_block_ms` when idle.

Each reader follows its shard: a new slot map (`ClusterScripts.on_map`)
retargets the readers whose shard moved, a failed read (the master died,
MOVED) asks for a new map, and after the replica took over the reader
continues from its last position, checking first that the new master has
everything it read (`following`). Per channel, order and exactly-once per
node hold as on one server: a channel lives on one shard, read by one reader.

With `broker.publish_wait_replicas >= 1` (`read_replicas`) each reader
reads a replica of the shard's master instead, and only while that replica
is in sync (`following`, "replicas only"): it then delivers only what
reached a replica, which is what the cluster keeps through a failover, and
a master that wakes up from a pause after it was replaced (split brain)
cannot show writes that the cluster is about to discard. With one replica
per master (the set-up the fault campaign runs) the replica read is the
one promoted.

`ok` is true while every shard's reader is reading; `statistics()` sums them.

Resource handling: `serve` owns a nursery with every shard's reader (each
owning its connection); all are closed when it is cancelled.
"""

from __future__ import annotations

import trio

from apix_trio.broker.model import Listener
from apix_trio.broker.redis.bus import BusReader, BusStatistics
from apix_trio.broker.redis.cluster import ClusterScripts
from apix_trio.broker.redis.following import FollowingBusReader
from apix_trio.broker.redis.keys import KeyLayout
from apix_trio.broker.redis.resp import RedisAddress
from apix_trio.broker.redis.support import RedisTuning
from apix_trio.broker.redis.topology import SlotMap
from apix_trio.protocol.event import Event


class ClusterBus(BusReader):
    """One reader per bus shard, each on the shard's master (module docstring).

    A BusReader by type (the broker takes one); it reads nothing itself."""

    def __init__(
        self,
        scripts: ClusterScripts,
        seed: RedisAddress,
        layout: KeyLayout,
        timeout: float,
        tuning: RedisTuning,
        *,
        read_replicas: bool = False,
    ) -> None:
        super().__init__("redis://", layout, timeout, tuning)
        self._slots = [layout.slot(shard) for shard in range(layout.bus_shards)]
        self.readers = [
            FollowingBusReader(
                scripts.slot_map.owner(slot) or seed,
                layout,
                timeout,
                tuning,
                shards=[shard],
                on_failure=scripts.request_refresh,
                cluster=True,
                replicas_only=read_replicas,
            )
            for shard, slot in enumerate(self._slots)
        ]
        for reader in self.readers:
            reader.listener = self._forward
        scripts.on_map.append(self._follow)

    def _forward(self, org: str, channel: str, event: Event) -> None:
        listener: Listener | None = self.listener
        if listener is not None:
            listener(org, channel, event)

    def _follow(self, slot_map: SlotMap) -> None:
        for reader, slot in zip(self.readers, self._slots, strict=True):
            owner = slot_map.owner(slot)
            if owner is not None:
                reader.retarget(owner)  # replicas-only readers ask it for its replica

    @property  # the base class keeps a flag; here every shard's reader must be reading
    def ok(self) -> bool:
        return all(reader.ok for reader in self.readers)

    @ok.setter
    def ok(self, value: bool) -> None:
        pass

    @property  # likewise: every shard's reader must know where it starts
    def positioned(self) -> bool:
        return all(reader.positioned for reader in self.readers)

    @positioned.setter
    def positioned(self, value: bool) -> None:
        pass

    @property  # the first failing shard reader's reason
    def failure(self) -> str:
        return next((reader.failure for reader in self.readers if reader.failure), "")

    @failure.setter
    def failure(self, value: str) -> None:
        pass

    def statistics(self) -> BusStatistics:
        parts = [reader.statistics() for reader in self.readers]
        return BusStatistics(
            events=sum(p.events for p in parts),
            reads=sum(p.reads for p in parts),
            failures=sum(p.failures for p in parts),
            gaps=sum(p.gaps for p in parts),
            lost=sum(p.lost for p in parts),
            resets=sum(p.resets for p in parts),
        )

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Run every shard's reader; reports started once each has (it knows
        where its shard ends, or failed to learn it once)."""
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as starting:
                for reader in self.readers:
                    starting.start_soon(nursery.start, reader.serve)
            task_status.started()
