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

Idle: after a flush the coalescer looks two more passes; when no connection
was marked meanwhile, it parks *idle*. A frame arriving after at least
`DIRECT_AFTER_IDLE` seconds of idleness (typically a lone event's fan-out)
has nothing to be merged with and need not wait for the coalescer at all: a
connection with nothing queued writes it at once (`begin_direct` ends
idleness and names that frame `direct_frame`), and so does every other
connection the same frame goes to, until the next flush. Any other frame
queued meanwhile is coalesced as usual, so a burst still leaves as a few
large writes: only its first frame goes out on its own. A frame arriving
sooner after the last flush is coalesced: in a steady stream (publishes
pipelined by their publisher, each sent as soon as earlier ones were
delivered) the next event is usually a moment behind, and one write for
both costs half the system calls of one each. The threshold is well above
that moment (tens to hundreds of microseconds) so that a scheduling hiccup
does not split such a stream, and well below the gaps of a sparse one. The coalescer still runs one
round after a direct write, whose flush commits the delivery tally
(`after_flush`).

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
DIRECT_AFTER_IDLE = 0.005
"""Seconds of idleness after which a frame is written at once (see above)."""
log = get_logger("apix.coalesce")


class Flushable(Protocol):
    def flush_ready(self) -> None:
        """Write what is queued without blocking; hand any rest to a writer task."""


class WriteCoalescer:
    """See the module docstring. One per node (`Hub.coalescer`)."""

    __slots__ = (
        "_idle_since",
        "_ready",
        "_wakeup",
        "added",
        "after_flush",
        "direct_frame",
        "flushes",
        "idle",
    )

    def __init__(self) -> None:
        self.after_flush: Callable[[], None] | None = None
        """Called after each flush (the hub commits its `DeliveryTally`)."""
        self._ready: list[Flushable] = []
        self._wakeup = trio.lowlevel.ParkingLot()
        self.added = 0
        """Frames queued so far (the coalescer waits while this keeps moving)."""
        self.flushes = 0
        self.idle = False
        """True while the coalescer is parked after two passes in which no
        connection was marked: ask `begin_direct` whether a frame may be
        written at once."""
        self._idle_since = 0.0
        self.direct_frame: bytes | None = None
        """The frame written at once since idleness ended (one event's
        fan-out, shared by its subscribers), until the next flush."""

    def begin_direct(self, frame: bytes) -> bool:
        """Whether `frame`, queued while idle, may be written at once.

        Idleness ends either way. True after `DIRECT_AFTER_IDLE` seconds of
        it: the same frame may then go out at once to its other connections
        until the next flush, and the coalescer runs a round (to commit the
        tally). False sooner: the caller queues and marks as usual."""
        self.idle = False
        if trio.current_time() - self._idle_since < DIRECT_AFTER_IDLE:
            return False
        self.direct_frame = frame
        self._wakeup.unpark_all()
        return True

    def mark(self, conn: Flushable) -> None:
        """`conn` has frames queued; the caller marks it once until flushed."""
        self._ready.append(conn)
        if len(self._ready) == 1:
            self.idle = False
            self._wakeup.unpark_all()

    def pending(self) -> int:
        return len(self._ready)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush ready connections until cancelled."""
        task_status.started()
        try:
            while True:
                rounds = MAX_PASSES // 2
                if not self._ready and self.direct_frame is None:
                    # The quiet look: two passes in which no connection is
                    # marked (no direct write can happen: not idle, no
                    # direct frame), and the coalescer parks idle.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    if not self._ready:
                        self.idle = True
                        self._idle_since = trio.current_time()
                        await self._wakeup.park()
                    else:
                        rounds -= 1  # that look was the first round of this burst
                # Two passes per look: trio may reverse a pass's order, so only
                # two of them are sure to hold one whole turn of every other task.
                for _ in range(rounds):
                    added = self.added
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    if self.added == added:
                        break
                self.direct_frame = None
                self.flush_all()
        finally:
            self.idle = False

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
