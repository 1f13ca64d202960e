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

Replicas only (`replicas_only`, the cluster and Sentinel bus with
`broker.publish_wait_replicas >= 1`): the reader reads a replica of the
master and hands on only entries that reached it, which is what survives
the master's failover, and the same rule the publisher's `WAIT` applies.
Found by the fault campaign: a paused master that the cluster replaced goes
on accepting writes for a moment after it wakes up (split brain), and a
reader on it delivered those writes, which the cluster then discarded, and
skipped the acknowledged writes its successor took meanwhile. A reader on
the replica sees neither: the replica follows the new master. The replica
is found on every connect: the master's `ROLE` names the replicas
connected to it, and the first one is read if its own `ROLE` says it
follows that master with its link `connected` (one still loading from its
master would serve its old data). While no in-sync replica is
known (the old master not back yet, a replica resyncing) the reader reads
nothing and is not `ok` (readiness 503), and tries again with its backoff:
the publishes of that time are refused anyway (`WAIT` finds no replica),
and what they stored is delivered once a replica has it. On a replica the
tail checks are skipped (a replica behind the reader's position is
lagging, not rolled back: XREAD from the position waits for the rest).
Every XREAD on a replica is followed, in the same pipeline, by `ROLE`
(`_vet`): a replica promoted while we read it (its master failed) takes
writes that no replica holds yet, so a read answered by a promoted server
is not handed on; the reader reconnects and reads a replica of the new
master once it has one. Also found by the campaign: such writes were
delivered, then lost when the promoted server failed in turn and its old
master, just restarted, took over with its own older data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import trio

from apix_trio.broker.model import BrokerUnavailable
from apix_trio.broker.redis.bus import BusReader
from apix_trio.broker.redis.keys import KeyLayout
from apix_trio.broker.redis.resp import RedisAddress, RedisConnection, open_connection
from apix_trio.broker.redis.support import RedisTuning, pack_command
from apix_trio.broker.redis.topology import ask_once
from apix_trio.observability.logs import get_logger
from apix_trio.protocol import ids

log = get_logger(__name__)

MOVED_AWAY = "the bus moved to another Redis server"
PROMOTED = "the bus replica was promoted to master: looking for a replica of it"
_ROLE = pack_command(b"ROLE")


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
        cluster: bool = False,
        replicas_only: bool = False,
    ) -> None:
        super().__init__("redis://", layout, timeout, tuning)
        self._address = address
        self._cluster = cluster  # a replica needs READONLY before it serves reads
        self._replicas_only = replicas_only
        self._on_replica = False  # the current connection reads a replica
        self._connecting_to = address  # the master (or server) of the last connect
        if shards is not None:
            self._names = [layout.bus(shard) for shard in shards]
            self._encoded_names = [name.encode() for name in self._names]
        self._on_failure = on_failure
        self._reading: trio.CancelScope | None = None
        self._reading_at: RedisAddress | None = None

    @property
    def address(self) -> RedisAddress:
        return self._address

    @property
    def reading_replica(self) -> bool:
        """Whether the current connection reads a replica (for tests and logs)."""
        return self._on_replica

    def retarget(self, address: RedisAddress) -> None:
        """Read at `address` from now on (see the module docstring); with
        `replicas_only`, `address` is the master whose replica is read."""
        if address == self._address:
            return
        self._address = address
        if self._reading is not None:
            self._reading.cancel()

    def _where(self) -> dict[str, str]:
        return {**super()._where(), "replica": str(self._on_replica).lower()}

    async def _connect(self) -> RedisConnection:
        master = self._address
        self._connecting_to = master
        self._on_replica = False
        if not self._replicas_only:
            return await open_connection(master, decode=False)
        if self._start_tails is None:
            # start where the master ends now, not where the bus ends once a
            # replica is ready: what is published meanwhile comes in order then
            first = await open_connection(master, decode=False)
            try:
                self._start_tails = await BusReader._tails(self, first)
                self.positioned = True
            finally:
                await first.aclose()
        replica = await self._replica_of(master)
        connection = await open_connection(replica, decode=False)
        try:
            if not await self._in_sync(connection, master):
                raise BrokerUnavailable(
                    f"the bus replica {_at(replica)} is not in sync with {_at(master)}"
                )
        except BaseException:
            await connection.aclose()
            raise
        self._on_replica = True
        return connection

    async def _replica_of(self, master: RedisAddress) -> RedisAddress:
        """The first replica that `master` lists in its `ROLE` as connected."""
        role = await ask_once(master, self._timeout, b"ROLE")
        try:
            if role[0] not in (b"master", "master"):
                raise BrokerUnavailable(f"{_at(master)} is not a master (ROLE {role[0]!r})")
            host, port = role[2][0][0], int(role[2][0][1])
        except (IndexError, TypeError, ValueError):
            raise BrokerUnavailable(f"no replica of {_at(master)} to read the bus from") from None
        host = host.decode() if isinstance(host, bytes) else str(host)
        return attrs.evolve(master, host=host, port=port)

    async def _in_sync(self, connection: RedisConnection, master: RedisAddress) -> bool:
        """Ask the replica (READONLY on a cluster, then ROLE) whether it
        follows `master` with its link up."""
        commands = [(b"READONLY",)] if self._cluster else []
        commands.append((b"ROLE",))
        await connection.send(b"".join(pack_command(*words) for words in commands))
        replies = [await connection.read_reply() for _ in commands]
        role = replies[-1]
        try:
            in_sync = (
                role[0] in (b"slave", "slave")
                and int(role[2]) == master.port
                and role[3] in (b"connected", "connected")
            )
        except (IndexError, TypeError, ValueError):
            in_sync = False
        if not in_sync:
            log.info("redis_bus_replica_not_in_sync", master=_at(master), role=repr(role))
        return in_sync

    async def _tails(self, connection: RedisConnection) -> list[tuple[str, int | None]]:
        # called right after connecting: remember where this connection goes
        self._reading_at = self._connecting_to
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

    def _vet_command(self) -> bytes:
        return _ROLE if self._on_replica else b""

    def _vet(self, verdict: Any) -> None:
        """On a replica: hand on a read only if the server was still a replica
        right after it (its `ROLE`, pipelined behind the XREAD). A replica
        promoted since we connected holds, past its promotion, writes that
        no replica has yet: the next connection looks for a replica of it."""
        try:
            still_replica = verdict[0] in (b"slave", "slave")
        except (IndexError, TypeError):
            still_replica = False
        if not still_replica:
            log.warning("redis_bus_replica_promoted", role=repr(verdict)[:80], **self._where())
            raise BrokerUnavailable(PROMOTED)

    def _check_tails(self, shards: Any, tails: list[tuple[str, int | None]]) -> None:
        if self._on_replica:
            return  # behind our position means lagging here, not rolled back
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


def _at(address: RedisAddress) -> str:
    """`host:port`, for messages and logs (no credentials, no options)."""
    return f"{address.host}:{address.port}"
