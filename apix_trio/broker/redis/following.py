"""A bus reader that follows its shards to another Redis server.

Theory of operation
-------------------
`bus.BusReader` reads on one address and, after a failure, reconnects to the
same one, checking on each reconnect that no shard now ends before its
position (`_check_tails`: a server that lost entries it had handed out).
On a Redis Cluster or behind Sentinel the server holding the bus moves: a
master fails and a replica takes over. `FollowingBusReader` adds:

- `retarget(address)`: from now on read there; a read in progress on the
  old address is abandoned (its connection closed) and the reader
  reconnects at once, from the positions it had: nothing doubled, and the
  new server's tails are checked like after any reconnect;
- a read that fails calls `on_failure` (the cluster refreshes its slot map,
  the sentinel watcher asks the sentinels) before the reader's usual backoff;
- the check after a reconnect also compares the sequence counter: a new
  server whose last entry of a shard has a lower `seq` than the reader
  already saw lacks entries that the old one acknowledged (a replica that
  lagged). Logged (`redis_bus_entries_lost`, error, with the count), counted
  as a reset, and the reader accepts the new numbering; clients learn of it
  through `recovered: false` (docs/redis.md, "Failover").

While a reader has not re-checked its shards on the new server, `ok` is
false (as after any failure), so the broker is not `ready`: readiness says
503 from the failure until the position check on the new master is done.

Resource handling and errors: as `bus.BusReader`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from apix_trio.broker.model import BrokerUnavailable
from apix_trio.broker.redis.bus import BusReader
from apix_trio.broker.redis.keys import KeyLayout
from apix_trio.broker.redis.resp import RedisAddress, RedisConnection
from apix_trio.broker.redis.support import RedisTuning
from apix_trio.observability.logs import get_logger
from apix_trio.protocol import ids

log = get_logger(__name__)

MOVED_AWAY = "the bus moved to another Redis server"


class FollowingBusReader(BusReader):
    """A `BusReader` over `shards` (all by default) at a movable address."""

    def __init__(
        self,
        address: RedisAddress,
        layout: KeyLayout,
        timeout: float,
        tuning: RedisTuning,
        *,
        shards: list[int] | None = None,
        on_failure: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__("redis://", layout, timeout, tuning)
        self._address = address
        if shards is not None:
            self._names = [layout.bus(shard) for shard in shards]
            self._encoded_names = [name.encode() for name in self._names]
        self._on_failure = on_failure
        self._reading: trio.CancelScope | None = None
        self._reading_at: RedisAddress | None = None

    @property
    def address(self) -> RedisAddress:
        return self._address

    def retarget(self, address: RedisAddress) -> None:
        """Read at `address` from now on (see the module docstring)."""
        if address == self._address:
            return
        self._address = address
        if self._reading is not None:
            self._reading.cancel()

    async def _tails(self, connection: RedisConnection) -> list[tuple[str, int | None]]:
        # called right after connecting: remember where this connection goes
        self._reading_at = self._address
        return await super()._tails(connection)

    async def _read_forever(self, connection: RedisConnection, shards: Any) -> None:
        if self._reading_at != self._address:  # retargeted while connecting
            raise BrokerUnavailable(MOVED_AWAY)
        with trio.CancelScope() as scope:
            self._reading = scope
            try:
                await super()._read_forever(connection, shards)
            except BrokerUnavailable:
                self._on_failure()
                raise
            finally:
                self._reading = None
        raise BrokerUnavailable(MOVED_AWAY)

    def _check_tails(self, shards: Any, tails: list[tuple[str, int | None]]) -> None:
        for shard, (tail, seq) in zip(shards, tails, strict=True):
            if shard.seq is None or seq is None or seq >= shard.seq:
                continue
            log.error(
                "redis_bus_entries_lost",
                shard=shard.name,
                lost=shard.seq - seq,
                position=shard.position,
                end=tail,
                hint="the new master lacks bus entries the old one had (a lagging replica)",
            )
            if ids.parse_id(tail) >= ids.parse_id(shard.position):
                # the base check sees no rollback by ids: count and renumber here
                self._resets += 1
                shard.seq = seq
        super()._check_tails(shards, tails)
