"""Audit trails in this process's memory (the embedded broker's store).

Semantics are `apix_trio.broker.audit`'s, checked by the same contract suite
as the Redis store. Ids come from `ids.next_id` on the injected wall clock
(the embedded broker's), so they increase per org even when the clock goes
back, and MockClock tests expire entries at exact virtual times.

A trail is a list of entries, oldest first, with a `head` index in front of
which entries are trimmed (compacted when the dead prefix outgrows the live
part). An append trims to exactly `max_entries` and drops entries older than
`ttl`; a page hides entries older than `ttl` even before an append drops
them. Every coroutine checkpoints and then runs without awaiting: each
operation is atomic with respect to other tasks.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from apix_trio.broker.audit import (
    SCAN_BUDGET,
    AuditLog,
    AuditPage,
    AuditQuery,
    AuditRetention,
    matches,
)
from apix_trio.observability.audit import AuditRecord
from apix_trio.protocol import ids

_COMPACT_MIN = 64


@attrs.define(slots=True)
class _Entry:
    """A stored record (its JSON form is built when a page reads it)."""

    id: ids.StreamId
    record: AuditRecord

    @property
    def type(self) -> str:
        return self.record.type

    @property
    def sub(self) -> str:
        return self.record.sub

    def json(self) -> dict[str, Any]:
        return self.record.as_entry(ids.format_id(self.id))


@attrs.define(eq=False)
class _Trail:
    entries: list[_Entry] = attrs.Factory(list)
    head: int = 0
    last: ids.StreamId = ids.ZERO

    def drop_front(self, count: int) -> None:
        self.head += count
        if self.head >= _COMPACT_MIN and self.head * 2 >= len(self.entries):
            del self.entries[: self.head]
            self.head = 0

    def first_live(self, floor_ms: int) -> int:
        """Index of the first entry not older than `floor_ms`."""
        at = self.head
        entries = self.entries
        while at < len(entries) and entries[at].id[0] < floor_ms:
            at += 1
        return at


class MemoryAuditLog(AuditLog):
    """See the module docstring. Never raises `BrokerUnavailable`."""

    def __init__(self, *, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock
        self._trails: dict[str, _Trail] = {}

    def _floor_ms(self, retention: AuditRetention) -> int:
        return int((self._wall_clock() - retention.ttl) * 1000)

    async def append_many(
        self, records: Sequence[AuditRecord], retention: AuditRetention
    ) -> list[str]:
        await trio.lowlevel.checkpoint()
        now_ms = max(0, int(self._wall_clock() * 1000))
        floor_ms = self._floor_ms(retention)
        stored: list[str] = []
        touched: set[str] = set()
        for record in records:
            trail = self._trails.setdefault(record.org, _Trail())
            trail.last = ids.next_id(trail.last, now_ms)
            trail.entries.append(_Entry(trail.last, record))
            stored.append(ids.format_id(trail.last))
            touched.add(record.org)
        for org in touched:
            trail = self._trails[org]
            excess = len(trail.entries) - trail.head - max(retention.max_entries, 0)
            if excess > 0:
                trail.drop_front(excess)
            expired = trail.first_live(floor_ms) - trail.head
            if expired > 0:
                trail.drop_front(expired)
        return stored

    async def page(self, org: str, query: AuditQuery, retention: AuditRetention) -> AuditPage:
        await trio.lowlevel.checkpoint()
        trail = self._trails.get(org)
        if trail is None:
            return AuditPage((), query.since or ids.ZERO_TEXT)
        start = trail.first_live(self._floor_ms(retention))
        entries = trail.entries
        found: list[dict[str, Any]] = []
        examined = 0
        if query.since is not None:
            since = ids.parse_id(query.since)
            at = max(start, bisect_right(entries, since, lo=trail.head, key=lambda e: e.id))
            position = ids.format_id(since)
            while at < len(entries) and len(found) < query.limit and examined < SCAN_BUDGET:
                entry = entries[at]
                examined += 1
                position = ids.format_id(entry.id)
                if matches(query, entry.type, entry.sub):
                    found.append(entry.json())
                at += 1
            return AuditPage(tuple(found), position)
        position = ids.format_id(entries[-1].id) if len(entries) > trail.head else ids.ZERO_TEXT
        at = len(entries) - 1
        while at >= start and len(found) < query.limit and examined < SCAN_BUDGET:
            entry = entries[at]
            examined += 1
            if matches(query, entry.type, entry.sub):
                found.append(entry.json())
            at -= 1
        found.reverse()
        return AuditPage(tuple(found), position)
