"""Consumer groups of the embedded broker (`ConsumerGroups` in memory).

Same observable semantics as Redis consumer groups (`redis/groups.py`); the
contract suite runs against both.

Theory of operation
-------------------
A group is `_Group`: the id of the last event it handed out (`last`), its
pending entries by event id, and its consumers with the time each was last
seen. Events come from the broker's own channel (`MemoryBroker.channel_log`), so
retention applies exactly as for history: an event trimmed or expired before
it was read is never handed out, and a pending one that is gone is dropped
by the next `claim`, `claim_idle`, `touch` or `release` that meets it.

`pending` is a dict, and entries only ever enter it from `read_new` in id
order, so its iteration order is id order (what XPENDING and XAUTOCLAIM scan).

Idle times run on `trio.current_time()` (so timer tests run on a MockClock);
Redis measures them on its own clock, which is equivalent for durations.

Every public coroutine checkpoints first and then runs without awaiting
(except `dead_letter`, which publishes through the broker and then acks
without awaiting in between), so each is atomic with respect to other tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import attrs
import trio

from apix_trio.broker.groups import (
    RELEASED,
    RELEASED_IDLE,
    ConsumerGroups,
    ConsumerInfo,
    Delivery,
    EventPublisher,
    GroupInfo,
    PendingEntry,
    publish_dead_letter,
)
from apix_trio.broker.model import Retention
from apix_trio.protocol import ids
from apix_trio.protocol.event import Event


class ChannelLog(Protocol):
    """One embedded channel as the groups read it."""

    @property
    def last(self) -> ids.StreamId: ...

    @property
    def retained(self) -> int: ...

    def after(self, since: ids.StreamId, limit: int) -> tuple[Event, ...]: ...

    def find(self, event_id: ids.StreamId) -> Event | None:
        """The retained event with this id, or None."""
        ...


class EmbeddedChannels(EventPublisher, Protocol):
    """What the groups need of the embedded broker: its channels, and
    `publish` for dead letters."""

    def channel_log(self, org: str, channel: str) -> ChannelLog: ...


GroupKey = tuple[str, str, str]


def assign_round_robin(wants: Sequence[tuple[str, int]], n: int) -> list[int]:
    """Indexes into `wants` for `n` events handed out round-robin, each
    consumer taking at most its count (`n` must not exceed the total)."""
    left = [max(count, 0) for _, count in wants]
    out: list[int] = []
    at = 0
    while len(out) < n:
        if left[at] > 0:
            left[at] -= 1
            out.append(at)
        at = (at + 1) % len(wants)
    return out


@attrs.define(eq=False)
class _Pending:
    consumer: str
    attempt: int
    since: float


@attrs.define(eq=False)
class _Group:
    last: ids.StreamId
    pending: dict[str, _Pending] = attrs.field(factory=dict)
    consumers: dict[str, float] = attrs.field(factory=dict)


class MemoryGroups(ConsumerGroups):
    """Consumer groups on a `MemoryBroker`'s channels. See the module docstring."""

    def __init__(self, broker: EmbeddedChannels) -> None:
        self._broker = broker
        self._groups: dict[GroupKey, _Group] = {}
        self._redrive: dict[GroupKey, ids.StreamId] = {}

    def _event(self, org: str, channel: str, event_id: str) -> Event | None:
        """The retained event with this id, or None when it is gone."""
        return self._broker.channel_log(org, channel).find(ids.parse_id(event_id))

    async def join(self, org: str, channel: str, group: str) -> None:
        await trio.lowlevel.checkpoint()
        if (org, channel, group) not in self._groups:
            last = self._broker.channel_log(org, channel).last
            self._groups[org, channel, group] = _Group(last=last)

    async def read_new(
        self, org: str, channel: str, group: str, wants: Sequence[tuple[str, int]]
    ) -> list[tuple[str, Delivery]]:
        await trio.lowlevel.checkpoint()
        wants = [(consumer, count) for consumer, count in wants if count > 0]
        if not wants:
            return []
        now = trio.current_time()
        # Like Redis: a group that vanished (or was never joined here) starts
        # over at the beginning of what the channel retains.
        state = self._groups.setdefault((org, channel, group), _Group(last=ids.ZERO))
        state.consumers[wants[0][0]] = now
        events = self._broker.channel_log(org, channel).after(state.last, sum(c for _, c in wants))
        out: list[tuple[str, Delivery]] = []
        for event, at in zip(events, assign_round_robin(wants, len(events)), strict=True):
            consumer = wants[at][0]
            state.pending[event.id] = _Pending(consumer, 1, now)
            state.consumers[consumer] = now
            out.append((consumer, Delivery(event, 1)))
        if events:
            state.last = ids.parse_id(events[-1].id)
        return out

    async def claim(
        self, org: str, channel: str, group: str, consumer: str, ids: Sequence[str]
    ) -> list[Delivery]:
        await trio.lowlevel.checkpoint()
        state = self._groups.get((org, channel, group))
        if state is None or not ids:
            return []
        now = trio.current_time()
        state.consumers[consumer] = now
        out: list[Delivery] = []
        for event_id in dict.fromkeys(ids):
            entry = state.pending.get(event_id)
            if entry is None:
                continue
            delivery = self._hand_over(org, channel, state, event_id, entry, consumer, now)
            if delivery is not None:
                out.append(delivery)
        return out

    def _hand_over(
        self,
        org: str,
        channel: str,
        state: _Group,
        event_id: str,
        entry: _Pending,
        consumer: str,
        now: float,
    ) -> Delivery | None:
        """Move one pending event to `consumer` (attempt + 1); None, and no
        longer pending, when the event was trimmed from the channel."""
        event = self._event(org, channel, event_id)
        if event is None:
            del state.pending[event_id]
            return None
        entry.consumer, entry.attempt, entry.since = consumer, entry.attempt + 1, now
        return Delivery(event, entry.attempt)

    async def claim_idle(
        self, org: str, channel: str, group: str, consumer: str, min_idle: float, count: int
    ) -> list[Delivery]:
        await trio.lowlevel.checkpoint()
        state = self._groups.get((org, channel, group))
        if state is None or count < 1:
            return []
        now = trio.current_time()
        state.consumers[consumer] = now
        out: list[Delivery] = []
        for event_id, entry in list(state.pending.items()):
            if len(out) >= count:
                break
            if entry.consumer != RELEASED and now - entry.since < min_idle:
                continue
            delivery = self._hand_over(org, channel, state, event_id, entry, consumer, now)
            if delivery is not None:
                out.append(delivery)
        return out

    async def touch(
        self, org: str, channel: str, group: str, consumer: str, ids: Sequence[str]
    ) -> list[str]:
        await trio.lowlevel.checkpoint()
        state = self._groups.get((org, channel, group))
        if state is None:
            return []
        now = trio.current_time()
        held = []
        for event_id in dict.fromkeys(ids):
            entry = state.pending.get(event_id)
            if entry is None or entry.consumer != consumer:
                continue
            if self._event(org, channel, event_id) is None:
                del state.pending[event_id]
                continue
            entry.since = now
            held.append(event_id)
        if held:
            state.consumers[consumer] = now
        return held

    async def release(self, org: str, channel: str, group: str, consumer: str) -> int:
        await trio.lowlevel.checkpoint()
        state = self._groups.get((org, channel, group))
        if state is None:
            return 0
        now = trio.current_time()
        released = 0
        for event_id, entry in list(state.pending.items()):
            if entry.consumer != consumer:
                continue
            if self._event(org, channel, event_id) is None:
                del state.pending[event_id]
                continue
            entry.consumer, entry.since = RELEASED, now - RELEASED_IDLE
            released += 1
        if released:
            state.consumers.setdefault(RELEASED, now)
        state.consumers.pop(consumer, None)
        return released

    async def ack(self, org: str, channel: str, group: str, ids: Sequence[str]) -> int:
        await trio.lowlevel.checkpoint()
        return self._ack(org, channel, group, ids)

    async def ack_many(
        self, org: str, channel: str, group: str, batches: Sequence[Sequence[str]]
    ) -> list[int]:
        await trio.lowlevel.checkpoint()
        return [self._ack(org, channel, group, ids) for ids in batches]

    def _ack(self, org: str, channel: str, group: str, ids: Sequence[str]) -> int:
        state = self._groups.get((org, channel, group))
        if state is None:
            return 0
        return sum(state.pending.pop(event_id, None) is not None for event_id in dict.fromkeys(ids))

    async def pending(
        self, org: str, channel: str, group: str, consumer: str | None = None
    ) -> list[PendingEntry]:
        await trio.lowlevel.checkpoint()
        state = self._groups.get((org, channel, group))
        if state is None:
            return []
        now = trio.current_time()
        return [
            PendingEntry(event_id, entry.consumer, entry.attempt, now - entry.since)
            for event_id, entry in state.pending.items()
            if consumer is None or entry.consumer == consumer
        ]

    async def dead_letter(
        self, org: str, channel: str, group: str, delivery: Delivery, retention: Retention
    ) -> Event:
        dead = await publish_dead_letter(self._broker, org, channel, group, delivery, retention)
        self._ack(org, channel, group, [delivery.event.id])
        return dead

    async def remove_idle_consumers(
        self, org: str, channel: str, group: str, min_idle: float
    ) -> list[str]:
        await trio.lowlevel.checkpoint()
        state = self._groups.get((org, channel, group))
        if state is None:
            return []
        now = trio.current_time()
        busy = {entry.consumer for entry in state.pending.values()}
        removed = [
            name
            for name, seen in state.consumers.items()
            if name not in busy and now - seen >= min_idle
        ]
        for name in removed:
            del state.consumers[name]
        return removed

    async def info(self, org: str, channel: str, group: str) -> GroupInfo | None:
        await trio.lowlevel.checkpoint()
        state = self._groups.get((org, channel, group))
        if state is None or not self._broker.channel_log(org, channel).retained:
            return None
        now = trio.current_time()
        counts: dict[str, int] = {}
        for entry in state.pending.values():
            counts[entry.consumer] = counts.get(entry.consumer, 0) + 1
        names = dict.fromkeys([*state.consumers, *counts])
        return GroupInfo(
            tuple(
                ConsumerInfo(name, counts.get(name, 0), now - state.consumers.get(name, now))
                for name in sorted(names)
            )
        )

    async def redrive_cursor(self, org: str, channel: str, group: str) -> str:
        await trio.lowlevel.checkpoint()
        return ids.format_id(self._redrive.get((org, channel, group), ids.ZERO))

    async def advance_redrive_cursor(
        self, org: str, channel: str, group: str, event_id: str
    ) -> str:
        wanted = ids.parse_id(event_id)
        await trio.lowlevel.checkpoint()
        key = (org, channel, group)
        cursor = max(self._redrive.get(key, ids.ZERO), wanted)
        self._redrive[key] = cursor
        return ids.format_id(cursor)
