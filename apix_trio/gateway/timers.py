"""One node-level timer service for every connection's timers.

Theory of operation
-------------------
A connection's timers (the heartbeat: next ping or pong deadline; the auth
timeout; the token warning and expiry) are entries in one heap, not tasks:
an idle connection then costs a few small objects instead of a task tree of
coroutines, cancel scopes and events per timer.

`call_at(deadline, callback)` adds an entry and returns it; `entry.cancel()`
removes it (synchronously: a cancelled entry drops its callback at once, so
it keeps nothing alive, and the heap is compacted whenever cancelled entries
outnumber live ones). `serve` is the one task that fires them: it sleeps
until the earliest deadline on the trio clock (so a `MockClock` test sees
exact times), wakes early when an earlier entry arrives, and calls each due
callback synchronously, in deadline order (ties: the order they were
added). A callback must not block; it may add or cancel entries. One that
raises is logged and the service goes on.

Deadlines are trio times (`trio.current_time()`).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable

import trio

from apix_trio.observability.logs import get_logger

log = get_logger("apix.timers")


class TimerEntry:
    """One scheduled callback; `cancel()` is idempotent and synchronous."""

    __slots__ = ("_service", "callback", "deadline", "seq")

    def __init__(
        self, service: TimerService, deadline: float, seq: int, callback: Callable[[], None]
    ) -> None:
        self._service: TimerService | None = service
        self.deadline = deadline
        self.seq = seq
        self.callback: Callable[[], None] | None = callback

    def __lt__(self, other: TimerEntry) -> bool:
        if self.deadline != other.deadline:
            return self.deadline < other.deadline
        return self.seq < other.seq

    @property
    def active(self) -> bool:
        return self.callback is not None

    def cancel(self) -> None:
        service = self._service
        if service is None:
            return
        self._service = None
        self.callback = None
        service._cancelled()


class TimerService:
    """See the module docstring. One per node (`Hub.timers`)."""

    def __init__(self) -> None:
        self._heap: list[TimerEntry] = []
        self._seq = itertools.count()
        self._live = 0
        self._wakeup = trio.lowlevel.ParkingLot()
        self._sleeping_until = math.inf
        self._fired = 0

    def __len__(self) -> int:
        """Entries still to fire (cancelled ones are not counted)."""
        return self._live

    def call_at(self, deadline: float, callback: Callable[[], None]) -> TimerEntry:
        """Call `callback()` at trio time `deadline` (at once if it is past)."""
        entry = TimerEntry(self, deadline, next(self._seq), callback)
        heapq.heappush(self._heap, entry)
        self._live += 1
        if deadline < self._sleeping_until:
            self._wakeup.unpark_all()
        return entry

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerEntry:
        return self.call_at(trio.current_time() + delay, callback)

    def _cancelled(self) -> None:
        self._live -= 1
        heap = self._heap
        if len(heap) > 64 and len(heap) > 2 * self._live:
            self._heap = [entry for entry in heap if entry.callback is not None]
            heapq.heapify(self._heap)

    def statistics(self) -> dict[str, int]:
        return {"live": self._live, "heap": len(self._heap), "fired": self._fired}

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fire due entries until cancelled."""
        task_status.started()
        while True:
            self._fire_due(trio.current_time())
            heap = self._heap
            self._sleeping_until = heap[0].deadline if heap else math.inf
            with trio.move_on_at(self._sleeping_until):
                await self._wakeup.park()
            self._sleeping_until = -math.inf

    def _fire_due(self, now: float) -> None:
        heap = self._heap
        while heap and (heap[0].callback is None or heap[0].deadline <= now):
            entry = heapq.heappop(heap)
            callback = entry.callback
            if callback is None:
                continue
            entry.callback = None
            entry._service = None
            self._live -= 1
            self._fired += 1
            try:
                callback()
            except Exception:
                log.exception("timer_callback_failed")
            heap = self._heap  # a callback may have compacted it
