"""The Redis Streams broker: events in Redis, fan-out through a sharded bus.

Theory of operation
-------------------
`open_redis_broker` opens a nursery for the broker's tasks, all trio-native
(`resp`: trio sockets, hiredis parsing; no asyncio):

    open_redis_broker
    ├── health supervisor   PING through the pipeline; capped exponential
    │                       backoff while Redis does not answer (batch.py)
    ├── pipeline            queued script calls -> batches written back to
    │                       back on one connection, replies read in order ->
    │                       each caller's own result             (batch.py)
    └── bus reader          one XREAD BLOCK over every bus shard on its own
                            connection -> the listener, per event, in order
                                                                 (bus.py)

Every operation is one Lua script call (`scripts`) on the keys of one
channel, all in one hash slot (`keys`): `publish` stores the event in
the channel stream, updates the channel's meta (last id, highest deleted id),
the idempotency record and appends a copy to the bus shard, atomically; the
reads return the events and what `recovered` needs in the same round trip.
This module turns Broker calls into script calls and replies into Events.

Error handling: transport failures and Redis errors become
`BrokerUnavailable` in `resp` and `batch`; every call gives up after
`broker.operation_timeout`. Caller mistakes (a malformed `since`, text with
lone surrogates) raise ValueError subclasses before anything is sent.
Reads also fail `BrokerUnavailable` until the bus reader has learnt where
the bus ends (a node started while Redis was unreachable): a subscription
started before that could miss the events between its replay and the
reader's start. Found by the fault campaign (a node restarted while
Sentinel named no master).

Resource handling: the nursery and both connections belong to
`open_redis_broker` and are closed when it exits; calls still queued or in
flight then fail with `BrokerUnavailable`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from apix_trio.broker.events import Broker
from apix_trio.broker.model import (
    TOMBSTONE_GRACE,
    BrokerUnavailable,
    ChannelInfo,
    Listener,
    Page,
    Published,
    Retention,
)
from apix_trio.broker.redis.audit import RedisAuditLog
from apix_trio.broker.redis.batch import BatchStatistics, ScriptBatcher
from apix_trio.broker.redis.bus import BusReader, BusStatistics
from apix_trio.broker.redis.directory import RedisDirectory
from apix_trio.broker.redis.groups import RedisGroups
from apix_trio.broker.redis.keys import KeyLayout, escape
from apix_trio.broker.redis.latency import RedisLatencySnapshots
from apix_trio.broker.redis.leases import RedisLeases
from apix_trio.broker.redis.listing import list_channels
from apix_trio.broker.redis.modes import open_mode
from apix_trio.broker.redis.presence import RedisPresence
from apix_trio.broker.redis.scripts import PUBLISH, READ
from apix_trio.broker.redis.sessions import RedisSessionStore
from apix_trio.broker.redis.state import RedisState
from apix_trio.broker.redis.support import RedisTuning
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
    org: bytes
    channel: bytes


_KEY_CACHE_SIZE = 65_536
NOT_POSITIONED = "the bus reader does not know where the bus ends yet"


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

    def __init__(
        self,
        settings: Settings,
        tuning: RedisTuning,
        components: tuple[ScriptBatcher, BusReader] | None = None,
    ) -> None:
        broker = settings.broker
        self._layout = KeyLayout(broker.key_prefix, broker.bus_shards)
        self._timeout = broker.operation_timeout
        self._tuning = tuning
        self._bus_maxlen = b"%d" % tuning.bus_maxlen
        self._key_cache: dict[tuple[str, str], _EncodedKeys] = {}
        self._retention_cache: dict[Retention, tuple[bytes, ...]] = {}
        if components is not None:  # cluster or sentinel (modes.open_mode)
            self.scripts, self.bus = components
            return
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
    def directory(self) -> RedisDirectory:
        """The connection directory of every node (`directory`)."""
        return RedisDirectory(self.scripts, self._layout)

    @functools.cached_property
    def presence(self) -> RedisPresence:
        """Channel presence; changes go out on the bus (`presence`)."""
        return RedisPresence(self.scripts, self._layout, self._tuning.bus_maxlen)

    @functools.cached_property
    def state(self) -> RedisState:
        """State values; changes go out on the bus (`state`)."""
        return RedisState(self.scripts, self._layout, self._tuning.bus_maxlen)

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
            keys.org,
            keys.channel,
            data.encode(),
            sender.encode(),
            key.encode() if key is not None else b"",
            *self._retention_args(retention),
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

    async def list_channels(self, org: str, prefix: str, limit: int) -> list[ChannelInfo]:
        """See `Broker.list_channels` and `listing` (a bounded SCAN)."""
        return await list_channels(self.scripts, self._layout, self.position, org, prefix, limit)

    async def _read(
        self, org: str, channel: str, mode: str, since: str, limit: int
    ) -> tuple[str, str, int, list[Any]]:
        if not self.bus.positioned:
            # A replay (or a subscription's starting position) read now could
            # end before where the bus reader will start, and the events in
            # between would reach neither: refuse until the reader knows.
            raise BrokerUnavailable(f"{NOT_POSITIONED}: {self.bus.failure or 'no answer yet'}")
        keys = self._keys(org, channel)
        args = (mode.encode(), since.encode(), b"%d" % max(0, limit))
        reply = await self.scripts.call(READ, keys.read, args, write=False, durable_read=True)
        last, deleted, stored, entries = reply
        return last, deleted, int(stored), entries or []

    def _retention_args(self, retention: Retention) -> tuple[bytes, ...]:
        """The publish script's retention arguments (cached: few distinct ones)."""
        found = self._retention_cache.get(retention)
        if found is None:
            if len(self._retention_cache) >= _KEY_CACHE_SIZE:
                self._retention_cache.clear()
            found = (
                b"%d" % max(0, retention.history_size),
                b"%d" % _ms(retention.history_ttl),
                b"%d" % _ms(retention.history_ttl + TOMBSTONE_GRACE),
                b"%d" % (_ms(retention.dedupe_window) if retention.dedupe_window > 0 else 0),
                self._bus_maxlen,
            )
            self._retention_cache[retention] = found
        return found

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
                org=org.encode(),
                channel=channel.encode(),
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

    Resource handling: owns a nursery and two connections (the pipeline's
    and the bus reader's), all closed on exit.

    Error handling: ValueError for an unusable key prefix or URL; Redis being
    down is not an error here (see `ready`).
    """
    tuning = tuning or RedisTuning()
    layout = KeyLayout(settings.broker.key_prefix, settings.broker.bus_shards)
    broker = RedisBroker(settings, tuning, await open_mode(settings.broker, layout, tuning))
    scripts, bus = broker.scripts, broker.bus
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scripts.serve)
            await nursery.start(scripts.serve_health)
            await nursery.start(bus.serve)
            try:
                yield broker
            finally:
                scripts.close()
                nursery.cancel_scope.cancel()
    finally:
        scripts.close()
