"""The Redis Streams broker: events in Redis, fan-out through a sharded bus.

Theory of operation
-------------------
`open_redis_broker` opens its own trio-asyncio loop (redis-py is an asyncio
library) and a nursery for the broker's tasks:

    open_redis_broker
    ├── health supervisor   PING; capped exponential backoff while Redis does
    │                       not answer                     (batch.py)
    ├── batch workers (N)   queued script calls -> one write + replies per
    │                       batch -> each caller's own result (batch.py)
    └── bus reader          one XREAD BLOCK over every bus shard -> the
                            listener, per event, in order    (bus.py)

Every operation is one Lua script call (`scripts`) on the keys of one
channel, all in one hash slot (`keys`): `publish` stores the event in
the channel stream, updates the channel's meta (last id, highest deleted id),
the idempotency record and appends a copy to the bus shard, atomically; the
reads return the events and what `recovered` needs in the same round trip.
This module turns Broker calls into script calls and replies into Events.

Error handling: Redis and asyncio errors become `BrokerUnavailable` where
trio calls into asyncio (`support.cross`); every call gives up after
`broker.operation_timeout`. Caller mistakes (a malformed `since`, text with
lone surrogates) raise ValueError subclasses before anything is sent.

Resource handling: the loop, the nursery and both connection pools belong to
`open_redis_broker` and are closed when it exits; calls still queued or in
flight then fail with `BrokerUnavailable`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import trio_asyncio

from apix_trio.broker.events import Broker
from apix_trio.broker.model import TOMBSTONE_GRACE, Listener, Page, Published, Retention
from apix_trio.broker.redis.audit import RedisAuditLog
from apix_trio.broker.redis.batch import BatchStatistics, ScriptBatcher
from apix_trio.broker.redis.bus import BusReader, BusStatistics
from apix_trio.broker.redis.groups import RedisGroups
from apix_trio.broker.redis.keys import KeyLayout, escape
from apix_trio.broker.redis.latency import RedisLatencySnapshots
from apix_trio.broker.redis.leases import RedisLeases
from apix_trio.broker.redis.scripts import PUBLISH, READ
from apix_trio.broker.redis.sessions import RedisSessionStore
from apix_trio.broker.redis.support import BACKEND_ERRORS, RedisTuning, cross
from apix_trio.observability.logs import get_logger
from apix_trio.protocol import ids
from apix_trio.protocol.event import Event
from apix_trio.settings import Settings

__all__ = ["RedisBroker", "RedisBrokerStatistics", "RedisTuning", "open_redis_broker"]

log = get_logger(__name__)


@attrs.frozen
class RedisBrokerStatistics:
    """A snapshot of the broker's counters (for metrics and tests)."""

    ready: bool
    batches: BatchStatistics
    bus: BusStatistics


@attrs.frozen
class _EncodedKeys:
    publish: tuple[bytes, ...]
    """stream, meta, bus, bus sequence"""
    read: tuple[bytes, ...]
    """stream, meta"""
    key_base: bytes
    """+ escaped idempotency key"""


_KEY_CACHE_SIZE = 65_536


def _ms(seconds: float) -> int:
    """A TTL in whole milliseconds, at least 1 (PEXPIRE 0 would delete)."""
    return max(1, math.ceil(seconds * 1000))


def _fields(flat: Sequence[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _event(entry: Sequence[Any]) -> Event:
    """An Event from a raw channel stream entry `[id, [field, value, ...]]`."""
    fields = _fields(entry[1])
    return Event(
        id=entry[0], ts=int(fields["t"]), data=fields["d"], sender=fields["f"], key=fields.get("k")
    )


class RedisBroker(Broker):
    """The Broker on Redis Streams. Open it with `open_redis_broker`."""

    def __init__(self, settings: Settings, tuning: RedisTuning) -> None:
        broker = settings.broker
        self._layout = KeyLayout(broker.key_prefix, broker.bus_shards)
        self._timeout = broker.operation_timeout
        self._tuning = tuning
        self._bus_maxlen = b"%d" % tuning.bus_maxlen
        self._key_cache: dict[tuple[str, str], _EncodedKeys] = {}
        self.scripts = ScriptBatcher(
            broker.redis_url, self._timeout, broker.publish_wait_replicas, tuning
        )
        self.bus = BusReader(broker.redis_url, self._layout, self._timeout, tuning)

    @functools.cached_property
    def groups(self) -> RedisGroups:
        """Consumer groups on the channel streams (`groups`)."""
        return RedisGroups(self.scripts, self, self._layout)

    @functools.cached_property
    def leases(self) -> RedisLeases:
        """Connection leases for the cluster-wide per-org cap (`leases`)."""
        return RedisLeases(self.scripts, self._layout.prefix)

    @functools.cached_property
    def audit(self) -> RedisAuditLog:
        """The org audit trails, one stream per org (`redis/audit.py`)."""
        return RedisAuditLog(self.scripts, self._layout)

    @functools.cached_property
    def latency(self) -> RedisLatencySnapshots:
        """Per-org latency snapshots, one hash per org (`redis/latency.py`)."""
        return RedisLatencySnapshots(self.scripts, self._layout)

    @property
    def sessions(self) -> RedisSessionStore:
        """Session records in this Redis (`sessions`; a stateless view)."""
        return RedisSessionStore(self.scripts, self._layout.prefix)

    # -- the Broker interface ------------------------------------------------

    def set_listener(self, listener: Listener) -> None:
        self.bus.listener = listener

    @property
    def ready(self) -> bool:
        """True while Redis answers and the bus reader is reading."""
        return self.scripts.healthy and self.bus.ok

    def statistics(self) -> RedisBrokerStatistics:
        return RedisBrokerStatistics(
            ready=self.ready, batches=self.scripts.statistics(), bus=self.bus.statistics()
        )

    async def publish(
        self,
        org: str,
        channel: str,
        data: str,
        *,
        sender: str,
        key: str | None,
        retention: Retention,
    ) -> Published:
        """Store one event (atomically, see `scripts.PUBLISH`).

        Error handling: BrokerUnavailable when Redis does not store it within
        `operation_timeout` (or fewer than `publish_wait_replicas` replicas
        acknowledged it); the event may have been stored anyway.
        UnicodeEncodeError (a ValueError) for text with lone surrogates.
        """
        keys = self._keys(org, channel)
        names = keys.publish
        if key is not None:
            names = (*names, keys.key_base + escape(key).encode())
        # Encoded here so that text Redis cannot take (lone surrogates) fails
        # this caller alone, with UnicodeEncodeError, before it is queued.
        args = (
            org.encode(),
            channel.encode(),
            data.encode(),
            sender.encode(),
            (key or "").encode(),
            b"%d" % max(0, retention.history_size),
            b"%d" % _ms(retention.history_ttl),
            b"%d" % _ms(retention.history_ttl + TOMBSTONE_GRACE),
            b"%d" % (_ms(retention.dedupe_window) if retention.dedupe_window > 0 else 0),
            self._bus_maxlen,
        )
        reply = await self.scripts.call(PUBLISH, names, args, write=True)
        if isinstance(reply, list):
            first_id, ts, first_data, first_sender = reply
            first = Event(id=first_id, ts=int(ts), data=first_data, sender=first_sender, key=key)
            return Published(first, duplicate=True)
        ts = int(reply.partition("-")[0])
        return Published(Event(id=reply, ts=ts, data=data, sender=sender, key=key), False)

    async def read_after(
        self, org: str, channel: str, since: str, limit: int, retention: Retention
    ) -> Page:
        """Up to `limit` retained events after `since` (`"0"` or an id).

        Raises `ids.BadStreamId` for a malformed `since` (a caller's error).
        """
        since_id = ids.parse_id(since)
        canonical = ids.format_id(since_id)
        last, deleted, stored, entries = await self._read(org, channel, "after", canonical, limit)
        max_deleted = ids.parse_id(deleted)
        # broker/events.py: a real id is stored or not after the highest deleted one;
        # recovered when it is, and nothing after it was deleted.
        recovered = since_id == max_deleted or (bool(stored) and since_id > max_deleted)
        return Page(
            events=tuple(_event(entry) for entry in entries), position=last, recovered=recovered
        )

    async def read_latest(self, org: str, channel: str, limit: int, retention: Retention) -> Page:
        last, _, _, entries = await self._read(org, channel, "latest", "0-0", limit)
        return Page(events=tuple(_event(entry) for entry in reversed(entries)), position=last)

    async def position(self, org: str, channel: str) -> str:
        last, _, _, _ = await self._read(org, channel, "position", "0-0", 0)
        return str(last)

    async def _read(
        self, org: str, channel: str, mode: str, since: str, limit: int
    ) -> tuple[str, str, int, list[Any]]:
        keys = self._keys(org, channel)
        args = (mode.encode(), since.encode(), b"%d" % max(0, limit))
        reply = await self.scripts.call(READ, keys.read, args, write=False)
        last, deleted, stored, entries = reply
        return last, deleted, int(stored), entries or []

    def _keys(self, org: str, channel: str) -> _EncodedKeys:
        """The channel's keys, encoded (cached: escaping and hashing add up)."""
        found = self._key_cache.get((org, channel))
        if found is None:
            if len(self._key_cache) >= _KEY_CACHE_SIZE:
                self._key_cache.clear()
            keys = self._layout.channel(org, channel)
            found = _EncodedKeys(
                publish=(
                    keys.stream.encode(),
                    keys.meta.encode(),
                    keys.bus.encode(),
                    keys.bus_seq.encode(),
                ),
                read=(keys.stream.encode(), keys.meta.encode()),
                key_base=keys.key_base.encode(),
            )
            self._key_cache[org, channel] = found
        return found


@asynccontextmanager
async def open_redis_broker(
    settings: Settings, *, tuning: RedisTuning | None = None
) -> AsyncIterator[RedisBroker]:
    """Open the Redis broker of `settings.broker` (redis_url must be set).

    Returns once the broker's tasks run and the bus reader knows where the
    bus ends (or failed to learn it: Redis may be down, then `ready` is
    false until it answers). Events published after this returns reach the
    listener.

    Resource handling: owns a trio-asyncio loop, a nursery and two connection
    pools, all closed on exit.

    Error handling: ValueError for an unusable key prefix or URL; Redis being
    down is not an error here (see `ready`).
    """
    tuning = tuning or RedisTuning()
    broker = RedisBroker(settings, tuning)
    scripts, bus = broker.scripts, broker.bus
    async with trio_asyncio.open_loop():
        try:
            await cross("open", scripts.aio_open, within=broker._timeout)
            await cross("open bus", bus.aio_open, within=broker._timeout)
            async with trio.open_nursery() as nursery:
                await nursery.start(scripts.serve_health)
                for _ in range(tuning.batch_workers):
                    await nursery.start(scripts.serve_batches)
                await nursery.start(bus.serve)
                try:
                    yield broker
                finally:
                    scripts.close()
                    nursery.cancel_scope.cancel()
        finally:
            scripts.close()
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                await _close_quietly(scripts.aio_close)
                await _close_quietly(bus.aio_close)


async def _close_quietly(close: Callable[[], Awaitable[None]]) -> None:
    try:
        await trio_asyncio.aio_as_trio(close)()
    except BACKEND_ERRORS as exc:
        log.info("redis_close_failed", error=repr(exc))
