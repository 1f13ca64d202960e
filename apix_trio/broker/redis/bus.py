"""The fan-out side of the Redis broker: read every bus shard, call the listener.

Theory of operation
-------------------
Every publish appends a full copy of its event to its bus shard
`<prefix>:{b<shard>}:bus`, as one field `e` holding the JSON array
`[seq, org, channel, id, ts, from, key|null, data]` (one string per entry
keeps the reader's parsing cheap); `seq` is the shard's entry counter.
Every node runs one `BusReader`, which issues one `XREAD COUNT n BLOCK ms
STREAMS <all shards> <last id of each>` at a time on its own connection, and
hands each entry to the listener in order. A channel lives on one shard, and
the script appends to the channel stream and the bus together, so the
listener sees each channel's events in id order.

Where it starts: at the end of every shard (the last entry when the broker
opens), resolved into concrete ids so that a read that times out and is
repeated misses nothing. After a failed read (Redis down, connection lost,
timeout) it waits with capped backoff and resumes from the last id it handed
on: nothing live is lost (the bus keeps `bus_maxlen` entries per shard) and
nothing is doubled.

Discontinuities are detected, not skipped silently:

- a sequence gap (`seq` jumps by more than one): the shard was trimmed past
  the reader (it fell more than `bus_maxlen` entries behind); the missed
  events are gone from the bus (their channel streams may still hold them);
- a sequence that does not increase, or a shard whose end is *before* the
  reader's position after a reconnect: the bus was recreated (FLUSHALL, a
  restart without persistence, failover to a replica that lagged); the
  reader moves to the new end.

Both are logged as errors and counted (`BusStatistics.gaps`, `.resets`,
`.lost`); see docs/redis.md for what an operator should do.

The connection: socket timeout above the BLOCK time, no redis-py retries (a
retried XREAD is harmless, but a silent one hides outages from `ok`).
"""

from __future__ import annotations

from typing import Any

import attrs
import orjson
import redis.asyncio as aioredis
import trio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from apix_trio.broker.model import BrokerUnavailable, Listener
from apix_trio.broker.redis.keys import KeyLayout
from apix_trio.broker.redis.support import RedisTuning, aio_close_client, backoff_delay, cross
from apix_trio.observability.logs import get_logger
from apix_trio.protocol import ids
from apix_trio.protocol.event import Event

log = get_logger(__name__)

_NO_ENTRY = ("0-0", None)


@attrs.frozen
class BusStatistics:
    events: int
    """Bus entries handed to the listener."""
    reads: int
    """Successful XREAD calls."""
    failures: int
    """Failed reads and position lookups (each followed by a backoff)."""
    gaps: int
    """Times a shard was found trimmed past the reader."""
    lost: int
    """Bus entries skipped by those gaps (known from the sequence numbers)."""
    resets: int
    """Times a shard was found recreated (FLUSHALL, restart without data)."""


@attrs.define(eq=False)
class _Shard:
    name: str
    position: str
    seq: int | None


class BusReader:
    """Reads the bus shards of one broker and calls `listener` per event."""

    def __init__(self, url: str, layout: KeyLayout, timeout: float, tuning: RedisTuning) -> None:
        self.listener: Listener | None = None
        self.ok = False
        self._url = url
        self._names = layout.buses()
        self._timeout = timeout
        self._tuning = tuning
        self._pool: aioredis.ConnectionPool | None = None
        self._client: aioredis.Redis | None = None
        self._events = 0
        self._reads = 0
        self._failures = 0
        self._gaps = 0
        self._lost = 0
        self._resets = 0

    def statistics(self) -> BusStatistics:
        return BusStatistics(
            events=self._events,
            reads=self._reads,
            failures=self._failures,
            gaps=self._gaps,
            lost=self._lost,
            resets=self._resets,
        )

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Read the bus forever. Reports started once it knows where the bus
        ends, or after the first failure to learn it."""
        shards: list[_Shard] | None = None
        failures = 0
        started = False
        while True:
            try:
                tails = await cross("bus positions", self._aio_tails, within=self._timeout)
                if shards is None:
                    shards = [
                        _Shard(name, position, seq)
                        for name, (position, seq) in zip(self._names, tails, strict=True)
                    ]
                else:
                    self._check_tails(shards, tails)
                self.ok = True
                failures = 0
                if not started:
                    started = True
                    task_status.started()
                await self._read_forever(shards)
            except BrokerUnavailable as exc:
                if self.ok or failures == 0:
                    log.warning("redis_bus_read_failed", error=str(exc))
                self.ok = False
                self._failures += 1
                failures += 1
                if not started:
                    started = True
                    task_status.started()
                await trio.sleep(
                    backoff_delay(failures, self._tuning.backoff_base, self._tuning.backoff_cap)
                )

    async def _read_forever(self, shards: list[_Shard]) -> None:
        by_name = {shard.name: shard for shard in shards}
        read_timeout = self._tuning.bus_block_ms / 1000 + self._timeout
        while True:
            positions = {shard.name: shard.position for shard in shards}
            reply = await cross("bus read", self._aio_read, positions, within=read_timeout)
            self._reads += 1
            self.ok = True
            for name, entries in reply:
                shard = by_name[name.decode()]
                for entry_id, fields in entries:
                    self._handle(shard, entry_id.decode(), fields)

    def _handle(self, shard: _Shard, entry_id: str, fields: dict[bytes, bytes]) -> None:
        shard.position = entry_id
        try:
            seq_text, org, channel, event_id, ts, sender, key, data = orjson.loads(fields[b"e"])
            seq = int(seq_text)
            event = Event(id=event_id, ts=int(ts), data=data, sender=sender, key=key)
        except (KeyError, ValueError, TypeError):
            log.error("redis_bus_bad_entry", shard=shard.name, entry=entry_id)
            return
        previous, shard.seq = shard.seq, seq
        if previous is not None and seq != previous + 1:
            if seq > previous:
                self._gaps += 1
                self._lost += seq - previous - 1
                log.error(
                    "redis_bus_gap",
                    shard=shard.name,
                    lost=seq - previous - 1,
                    hint="the reader fell more than bus_maxlen entries behind",
                )
            else:
                self._resets += 1
                log.error("redis_bus_recreated", shard=shard.name, seq=seq, previous=previous)
        self._events += 1
        listener = self.listener
        if listener is not None:
            try:
                listener(org, channel, event)
            except Exception:
                log.exception("listener_failed", org=org, channel=channel, id=event.id)

    def _check_tails(self, shards: list[_Shard], tails: list[tuple[str, int | None]]) -> None:
        """After a reconnect: a shard that now ends before our position was
        recreated (or rolled back); continue from its new end."""
        for shard, (tail, seq) in zip(shards, tails, strict=True):
            if ids.parse_id(tail) < ids.parse_id(shard.position):
                self._resets += 1
                log.error(
                    "redis_bus_rolled_back", shard=shard.name, position=shard.position, end=tail
                )
                shard.position, shard.seq = tail, seq

    # -- the asyncio side ------------------------------------------------------

    async def aio_open(self) -> None:
        self._pool = aioredis.ConnectionPool.from_url(
            self._url,
            max_connections=1,
            socket_timeout=self._tuning.bus_block_ms / 1000 + self._timeout,
            socket_connect_timeout=self._timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,  # entries are decoded by orjson
            protocol=2,
        )
        self._client = aioredis.Redis(connection_pool=self._pool)

    async def aio_close(self) -> None:
        await aio_close_client(self._client, self._pool)

    async def _aio_tails(self) -> list[tuple[str, int | None]]:
        """The last entry id and sequence of every shard."""
        assert self._client is not None
        async with self._client.pipeline(transaction=False) as pipe:
            for name in self._names:
                pipe.xrevrange(name, count=1)
            replies = await pipe.execute()
        tails: list[tuple[str, int | None]] = []
        for entries in replies:
            if entries:
                entry_id, fields = entries[0]
                try:
                    seq: int | None = int(orjson.loads(fields[b"e"])[0])
                except (KeyError, ValueError, TypeError, IndexError):
                    seq = None
                tails.append((entry_id.decode(), seq))
            else:
                tails.append(_NO_ENTRY)
        return tails

    async def _aio_read(self, positions: dict[str, str]) -> list[Any]:
        assert self._client is not None
        reply = await self._client.xread(
            positions,  # type: ignore[arg-type]
            count=self._tuning.bus_count,
            block=self._tuning.bus_block_ms,
        )
        return list(reply or [])
