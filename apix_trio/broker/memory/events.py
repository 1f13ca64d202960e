"""The embedded broker: every channel in this process's memory.

Used when no Redis is configured (one node). It has exactly the semantics of
`apix_trio.broker.events`; the contract suite runs against it and Redis alike.

Theory of operation
-------------------
A channel is a `_Channel`: a list of `(id, event)` pairs, oldest first, with a
`head` index in front of which entries are already trimmed (the list is
compacted only when the dead prefix outgrows the live part, so trimming is
amortised O(1) and reads are a bisect, O(log n)). Beside the events it keeps
`last` (the newest id ever given, which also survives expiry as the tombstone)
and `max_deleted` (the newest id trimmed or expired), which make `recovered`
exact: every retained id is greater than `max_deleted` (trimming and expiry
remove the oldest first), and every id the channel ever gave is retained or
at most `max_deleted`. So a read after `since` missed nothing, and `since` is
an id of this channel (or "0-0" before anything was deleted), exactly when
`since` is retained or equals `max_deleted`; a forgotten channel is the empty
one, where only "0-0" qualifies.

Time is the injected wall clock (seconds, like `time.time`), because ids carry
wall-clock milliseconds and retention is measured in wall seconds, as Redis
does. Ids come from `ids.next_id`, so they never go backwards, even when the
clock does. A channel's history expires `history_ttl` after its last publish
(at or after that instant); the channel is forgotten `TOMBSTONE_GRACE` later.
An idempotency key is forgotten `dedupe_window` after the publish that stored
it (duplicates do not extend it).

Expiry is lazy (every access settles the channel it touches first) and swept:
two min-heaps hold due times, and every operation pops at most `_SWEEP_BATCH`
due entries of each. The key heap has one entry per stored key. A channel's
entry comes due no later than its next deadline (history expiry while it
retains events, else forgetting); a publish that only pushes the deadline
later adds nothing (the entry moves when it pops), so a hot channel does not
grow the heap, and only a deadline moving earlier (events retained again
after expiry) adds an entry, leaving the old one to be dropped as stale. Each
publish adds at most one entry to each heap and each operation removes up to
`_SWEEP_BATCH`, so idle channels and old keys never accumulate.

Every public coroutine checkpoints first and then runs without awaiting, so
each operation is atomic with respect to other tasks, and a cancelled publish
stored nothing.
"""

from __future__ import annotations

import heapq
import itertools
import time
from bisect import bisect_left, bisect_right
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from operator import itemgetter

import attrs
import trio

from apix_trio.broker.events import Broker
from apix_trio.broker.leases import MemoryLeases
from apix_trio.broker.memory.audit import MemoryAuditLog
from apix_trio.broker.memory.directory import MemoryDirectory
from apix_trio.broker.memory.groups import MemoryGroups
from apix_trio.broker.memory.latency import MemoryLatencySnapshots
from apix_trio.broker.memory.presence import MemoryPresence
from apix_trio.broker.memory.sessions import MemorySessionStore
from apix_trio.broker.memory.state import MemoryState
from apix_trio.broker.model import (
    TOMBSTONE_GRACE,
    ChannelInfo,
    Listener,
    Page,
    Published,
    Retention,
)
from apix_trio.protocol import ids
from apix_trio.protocol.event import Event
from apix_trio.protocol.names import is_channel

_SWEEP_BATCH = 32
"""Due heap entries handled per operation (bounds the pause of one call)."""

_COMPACT_MIN = 64
"""A trimmed prefix shorter than this is never compacted away."""

ChannelKey = tuple[str, str]
DedupeKey = tuple[str, str, str]
_Entry = tuple[ids.StreamId, Event]
_entry_id: Callable[[_Entry], ids.StreamId] = itemgetter(0)


@attrs.frozen
class MemoryBrokerStatistics:
    """A snapshot of what the broker holds (for metrics and leak checks)."""

    channels: int
    retained_events: int
    dedupe_keys: int
    scheduled_expiries: int


@attrs.define(eq=False)
class _Channel:
    key: ChannelKey
    entries: list[_Entry] = attrs.field(factory=list)
    head: int = 0
    last: ids.StreamId = ids.ZERO
    max_deleted: ids.StreamId = ids.ZERO
    expires_at: float = 0.0
    scheduled_at: float | None = None

    @property
    def retained(self) -> int:
        return len(self.entries) - self.head

    @property
    def forget_at(self) -> float:
        return self.expires_at + TOMBSTONE_GRACE

    def next_deadline(self) -> float:
        """When the channel next changes by itself: its history expires, or,
        with nothing retained, it is forgotten."""
        return self.expires_at if self.retained else self.forget_at

    def append(self, entry: _Entry, keep: int) -> None:
        self.entries.append(entry)
        self.last = entry[0]
        self.trim(keep)

    def trim(self, keep: int) -> None:
        """Keep only the newest `keep` events (all of them may go)."""
        excess = self.retained - max(keep, 0)
        if excess <= 0:
            return
        self.head += excess
        self.max_deleted = self.entries[self.head - 1][0]
        if self.head >= _COMPACT_MIN and self.head * 2 >= len(self.entries):
            del self.entries[: self.head]
            self.head = 0

    def expire_history(self) -> None:
        self.entries = []
        self.head = 0
        self.max_deleted = self.last

    def recovered(self, since: ids.StreamId) -> bool:
        """broker/events.py's rule. A `since` after `last` is neither retained nor
        `max_deleted`, so it is not recovered without a test of its own."""
        if since == self.max_deleted:
            return True
        at = bisect_left(self.entries, since, lo=self.head, key=_entry_id)
        return at < len(self.entries) and self.entries[at][0] == since

    def find(self, event_id: ids.StreamId) -> Event | None:
        """The retained event with this id, or None when it is gone."""
        at = bisect_left(self.entries, event_id, lo=self.head, key=lambda entry: entry[0])
        if at < len(self.entries) and self.entries[at][0] == event_id:
            return self.entries[at][1]
        return None

    def after(self, since: ids.StreamId, limit: int) -> tuple[Event, ...]:
        start = bisect_right(self.entries, since, lo=self.head, key=_entry_id)
        return tuple(event for _, event in self.entries[start : start + max(limit, 0)])

    def latest(self, limit: int) -> tuple[Event, ...]:
        start = max(self.head, len(self.entries) - max(limit, 0))
        return tuple(event for _, event in self.entries[start:])


_NEVER = _Channel(key=("", ""))
"""Stands for a channel that never existed (or was forgotten); never mutated."""


@attrs.define(eq=False)
class _Remembered:
    event: Event
    expires_at: float


class MemoryBroker(Broker):
    """The embedded broker (see the module docstring). Build it with
    `open_memory_broker`.

    Error handling: it never raises `BrokerUnavailable`; `read_after` raises
    `ids.BadStreamId` for a malformed `since` (callers validate it first). An
    exception from the listener propagates to the publisher, after the event
    was stored (listeners must not raise).
    """

    def __init__(self, *, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock
        self._listener: Listener | None = None
        self._channels: dict[ChannelKey, _Channel] = {}
        self._keys: dict[DedupeKey, _Remembered] = {}
        self._order = itertools.count()
        self._channel_heap: list[tuple[float, int, _Channel]] = []
        self._key_heap: list[tuple[float, DedupeKey]] = []
        self._sessions = MemorySessionStore(wall_clock=wall_clock)
        self._groups = MemoryGroups(self)
        self._leases = MemoryLeases(wall_clock)
        self._directory = MemoryDirectory(wall_clock)
        self._presence = MemoryPresence(self._fan_out, wall_clock)
        self._state = MemoryState(self._fan_out, wall_clock)
        self._audit = MemoryAuditLog(wall_clock=wall_clock)
        self._latency = MemoryLatencySnapshots()

    @property
    def groups(self) -> MemoryGroups:
        """Consumer groups on this broker's channels (`memory/groups.py`)."""
        return self._groups

    @property
    def leases(self) -> MemoryLeases:
        """Connection leases for the per-org cap, in memory."""
        return self._leases

    @property
    def directory(self) -> MemoryDirectory:
        """The connection directory, in memory, on the broker's wall clock."""
        return self._directory

    @property
    def presence(self) -> MemoryPresence:
        """Channel presence, in memory; changes go to the listener (`memory/presence.py`)."""
        return self._presence

    @property
    def state(self) -> MemoryState:
        """State values, in memory; changes go to the listener (`memory/state.py`)."""
        return self._state

    def _fan_out(self, org: str, channel: str, event: Event) -> None:
        if self._listener is not None:
            self._listener(org, channel, event)

    @property
    def sessions(self) -> MemorySessionStore:
        """Session records, in memory, on the broker's wall clock."""
        return self._sessions

    @property
    def audit(self) -> MemoryAuditLog:
        """The org audit trails, in memory, on the broker's wall clock."""
        return self._audit

    @property
    def latency(self) -> MemoryLatencySnapshots:
        """Latency snapshots (this node's own), in memory."""
        return self._latency

    def set_listener(self, listener: Listener) -> None:
        """Call `listener` for every event published from now on, before the
        publish returns, in id order."""
        self._listener = listener

    @property
    def ready(self) -> bool:
        """Always true: memory does not go away."""
        return True

    def statistics(self) -> MemoryBrokerStatistics:
        return MemoryBrokerStatistics(
            channels=len(self._channels),
            retained_events=sum(channel.retained for channel in self._channels.values()),
            dedupe_keys=len(self._keys),
            scheduled_expiries=len(self._channel_heap) + len(self._key_heap),
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
        """Store one event and hand it to the listener; see `Broker.publish`.

        The event's `ts` is its id's milliseconds (the wall clock, unless the
        clock went back, in which case ids keep the newest time seen).
        """
        await trio.lowlevel.checkpoint()
        now = self._wall_clock()
        self._sweep(now)
        dedupe_key = (org, channel, key) if key is not None else None
        if dedupe_key is not None:
            remembered = self._remembered(dedupe_key, now)
            if remembered is not None:
                return Published(event=remembered.event, duplicate=True)
        state = self._live(org, channel, now) or self._create((org, channel))
        stream_id = ids.next_id(state.last, max(int(now * 1000), 0))
        event = Event(
            id=ids.format_id(stream_id), ts=stream_id[0], data=data, sender=sender, key=key
        )
        state.append((stream_id, event), retention.history_size)
        state.expires_at = now + retention.history_ttl
        self._schedule(state)
        if dedupe_key is not None:
            expires_at = now + retention.dedupe_window
            self._keys[dedupe_key] = _Remembered(event=event, expires_at=expires_at)
            heapq.heappush(self._key_heap, (expires_at, dedupe_key))
        if self._listener is not None:
            self._listener(org, channel, event)
        return Published(event=event, duplicate=False)

    async def read_after(
        self, org: str, channel: str, since: str, limit: int, retention: Retention
    ) -> Page:
        """Up to `limit` retained events with id > `since` (`"0"` or an id),
        oldest first, with `recovered` exactly as in the base module."""
        since_id = ids.parse_id(since)
        await trio.lowlevel.checkpoint()
        state = self._read(org, channel)
        return Page(
            events=state.after(since_id, limit),
            position=ids.format_id(state.last),
            recovered=state.recovered(since_id),
        )

    async def read_latest(self, org: str, channel: str, limit: int, retention: Retention) -> Page:
        """The newest `limit` retained events, oldest first."""
        await trio.lowlevel.checkpoint()
        state = self._read(org, channel)
        return Page(events=state.latest(limit), position=ids.format_id(state.last))

    async def position(self, org: str, channel: str) -> str:
        """The channel's last id (kept through expiry while the tombstone
        lives), `"0-0"` when it has none."""
        await trio.lowlevel.checkpoint()
        return ids.format_id(self._read(org, channel).last)

    async def list_channels(self, org: str, prefix: str, limit: int) -> list[ChannelInfo]:
        """See `Broker.list_channels` (every channel of the process is looked at)."""
        await trio.lowlevel.checkpoint()
        now = self._wall_clock()
        found = []
        for (owner, channel), state in list(self._channels.items()):
            if owner != org or not channel.startswith(prefix) or not is_channel(channel):
                continue
            if self._settle(state, now) and state.retained:
                found.append(ChannelInfo(channel, ids.format_id(state.last)))
        found.sort(key=lambda info: info.channel)
        return found[: max(limit, 0)]

    # -- expiry ------------------------------------------------------------

    def channel_log(self, org: str, channel: str) -> _Channel:
        """The channel as it is now (expired history swept first)."""
        return self._read(org, channel)

    def _read(self, org: str, channel: str) -> _Channel:
        now = self._wall_clock()
        self._sweep(now)
        return self._live(org, channel, now) or _NEVER

    def _create(self, key: ChannelKey) -> _Channel:
        state = _Channel(key=key)
        self._channels[key] = state
        return state

    def _live(self, org: str, channel: str, now: float) -> _Channel | None:
        """The channel with its expiry applied at `now`, or None if it is
        unknown or was just forgotten."""
        state = self._channels.get((org, channel))
        if state is None or self._settle(state, now):
            return state
        return None

    def _settle(self, state: _Channel, now: float) -> bool:
        """Apply expiry at `now`; False when the channel is forgotten."""
        if now >= state.forget_at:
            del self._channels[state.key]
            return False
        if now >= state.expires_at and state.retained:
            state.expire_history()
        self._schedule(state)
        return True

    def _schedule(self, state: _Channel) -> None:
        """Make sure a heap entry comes due no later than the channel's next
        deadline. Later deadlines (a publish extending the history) keep the
        entry, which is moved when it pops."""
        deadline = state.next_deadline()
        if state.scheduled_at is None or deadline < state.scheduled_at:
            state.scheduled_at = deadline
            heapq.heappush(self._channel_heap, (deadline, next(self._order), state))

    def _remembered(self, dedupe_key: DedupeKey, now: float) -> _Remembered | None:
        remembered = self._keys.get(dedupe_key)
        if remembered is not None and now >= remembered.expires_at:
            del self._keys[dedupe_key]
            return None
        return remembered

    def _sweep(self, now: float) -> None:
        """Expire up to `_SWEEP_BATCH` due channels and due keys."""
        heap = self._channel_heap
        for _ in range(_SWEEP_BATCH):
            if not heap or heap[0][0] > now:
                break
            due, _, state = heapq.heappop(heap)
            if self._channels.get(state.key) is state and state.scheduled_at == due:
                state.scheduled_at = None
                self._settle(state, now)
        keys = self._key_heap
        for _ in range(_SWEEP_BATCH):
            if not keys or keys[0][0] > now:
                break
            _, dedupe_key = heapq.heappop(keys)
            self._remembered(dedupe_key, now)


@asynccontextmanager
async def open_memory_broker(
    *, wall_clock: Callable[[], float] = time.time
) -> AsyncIterator[MemoryBroker]:
    """Open the embedded broker for the duration of the block.

    Resource handling: it holds only memory and runs no task; everything is
    dropped when the block exits. The shape matches `open_redis_broker` so
    the server opens either the same way.
    """
    await trio.lowlevel.checkpoint()
    yield MemoryBroker(wall_clock=wall_clock)
