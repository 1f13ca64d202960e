"""Coalesced delivery: one socket write per connection per scheduler tick.

Theory of operation
-------------------
Frames for a connection (event pushes from the router, replies, replay
pages) are queued in its outbox, never written one by one. The first frame
queued for a connection marks it *ready* here; the node's one coalescer task
then writes every ready connection's queued frames with one non-blocking
`send` each (`Flushable.flush_ready`).

When: the coalescer is woken by the first mark and runs in the next
scheduler pass; it then lets two more passes go by (trio may reverse the
order of a pass, so only two passes are sure to include one whole turn of
every runnable task) and keeps doing so while frames are still being added
(a burst of publishes, a replay page, a group batch, each produced by a
task that yields between events), at most `MAX_PASSES` passes. It never
waits on a timer: a lone event is written as soon as the tasks that were
already runnable have had their turn, a fraction of a millisecond; a burst
is written as a few large writes instead of one per frame.

Order: frames leave a connection's outbox in the order they were queued,
and only one writer (the coalescer, or the connection's writer task while a
short write is being finished) writes a connection at a time, so nothing is
reordered; see `Connection.flush_ready`. A connection closed meanwhile is
skipped (its outbox is closed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from apix_trio.observability.logs import get_logger

MAX_PASSES = 8
log = get_logger("apix.coalesce")


class Flushable(Protocol):
    def flush_ready(self) -> None:
        """Write what is queued without blocking; hand any rest to a writer task."""


class WriteCoalescer:
    """See the module docstring. One per node (`Hub.coalescer`)."""

    __slots__ = ("_ready", "_wakeup", "added", "after_flush", "flushes")

    def __init__(self) -> None:
        self.after_flush: Callable[[], None] | None = None
        """Called after each flush (the hub commits its `DeliveryTally`)."""
        self._ready: list[Flushable] = []
        self._wakeup = trio.lowlevel.ParkingLot()
        self.added = 0
        """Frames queued so far (the coalescer waits while this keeps moving)."""
        self.flushes = 0

    def mark(self, conn: Flushable) -> None:
        """`conn` has frames queued; the caller marks it once until flushed."""
        self._ready.append(conn)
        if len(self._ready) == 1:
            self._wakeup.unpark_all()

    def pending(self) -> int:
        return len(self._ready)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush ready connections until cancelled."""
        task_status.started()
        while True:
            if not self._ready:
                await self._wakeup.park()
            # Two passes per look: trio may reverse a pass's order, so only
            # two of them are sure to hold one whole turn of every other task.
            for _ in range(MAX_PASSES // 2):
                added = self.added
                await trio.lowlevel.cancel_shielded_checkpoint()
                await trio.lowlevel.cancel_shielded_checkpoint()
                if self.added == added:
                    break
            self.flush_all()

    def flush_all(self) -> None:
        ready, self._ready = self._ready, []
        self.flushes += 1
        for conn in ready:
            try:
                conn.flush_ready()
            except Exception:
                log.exception("flush_failed")
        if self.after_flush is not None:
            self.after_flush()
