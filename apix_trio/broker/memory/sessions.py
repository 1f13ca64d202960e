"""Session records in this process's memory (the embedded broker's store).

Semantics are `apix_trio.broker.sessions`', checked by the same contract
suite as the Redis store. Time is the injected wall clock (the embedded
broker's), so MockClock tests expire records at exact virtual times.

Expiry is lazy (a load of an expired record forgets it) and swept: a min-heap
holds one (due, key) entry per record, and every save pops at most
`_SWEEP_BATCH` due ones, so records of sessions nobody resumes never
accumulate. A save only moves a record's deadline later, so it leaves the
entry alone; an entry that pops before its record's deadline is pushed again
at that deadline. The heap never outgrows the records (plus deleted ones
whose entry has not popped yet).

Every coroutine checkpoints and then runs without awaiting: each operation is
atomic with respect to other tasks.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence

import trio

from apix_trio.broker.sessions import SessionRecord, SessionStore

_SWEEP_BATCH = 64

_Key = tuple[str, str]


class MemorySessionStore(SessionStore):
    """See the module docstring. Never raises `BrokerUnavailable`."""

    def __init__(self, *, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock
        self._records: dict[_Key, tuple[SessionRecord, float]] = {}
        self._heap: list[tuple[float, _Key]] = []
        self._scheduled: set[_Key] = set()

    def __len__(self) -> int:
        """Records held, expired ones not yet swept included."""
        return len(self._records)

    async def save(self, org: str, record: SessionRecord, ttl: float) -> bool:
        await trio.lowlevel.checkpoint()
        now = self._wall_clock()
        self._sweep(now)
        return self._save(org, record, now + ttl, now)

    async def save_many(self, items: Sequence[tuple[str, SessionRecord]], ttl: float) -> int:
        await trio.lowlevel.checkpoint()
        now = self._wall_clock()
        self._sweep(now)
        return sum(self._save(org, record, now + ttl, now) for org, record in items)

    async def load(self, org: str, session: str) -> SessionRecord | None:
        await trio.lowlevel.checkpoint()
        return self._live((org, session), self._wall_clock())

    async def delete(self, org: str, session: str) -> None:
        await trio.lowlevel.checkpoint()
        self._records.pop((org, session), None)

    def _save(self, org: str, record: SessionRecord, expires_at: float, now: float) -> bool:
        key = (org, record.session)
        current = self._live(key, now)
        if current is not None and current.epoch > record.epoch:
            return False
        self._records[key] = (record, expires_at)
        if key not in self._scheduled:
            self._scheduled.add(key)
            heapq.heappush(self._heap, (expires_at, key))
        return True

    def _live(self, key: _Key, now: float) -> SessionRecord | None:
        found = self._records.get(key)
        if found is None:
            return None
        record, expires_at = found
        if now >= expires_at:
            del self._records[key]
            return None
        return record

    def _sweep(self, now: float) -> None:
        heap = self._heap
        for _ in range(_SWEEP_BATCH):
            if not heap or heap[0][0] > now:
                return
            _, key = heapq.heappop(heap)
            found = self._records.get(key)
            if found is not None and found[1] > now:
                heapq.heappush(heap, (found[1], key))
                continue
            self._records.pop(key, None)
            self._scheduled.discard(key)
