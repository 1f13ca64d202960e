"""A connection's bounded outbound queue.

Theory of operation
-------------------
The router and the op handlers put ready-made frame bytes here with
`put_nowait`, which never blocks: when the queue already holds `max_items`
frames or `max_bytes` bytes, the put is refused and the caller treats the
connection as a slow consumer (close 4009). Replays, which may produce far
more frames than fit, use `wait_room` first, so back-pressure holds them
instead of tripping the slow-consumer close; they wait for room within a
`share` of the limits (half), so live events of the connection's other
subscriptions still find the rest free while a long replay runs.

One writer task drains the queue with `get_batch`, which waits for at least
one frame and then takes every queued frame up to a byte budget, so a burst
of events costs one `send_all` instead of one per frame.

A deque plus a parking lot is used rather than a trio memory channel because
the queue must account bytes as well as items and hand out whole batches.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import attrs
import trio

from apix_trio.protocol.ids import StreamId
from apix_trio.routing.subscriptions import SentTracker


@attrs.frozen
class OutboxStatistics:
    items: int
    bytes: int
    high_water_items: int
    high_water_bytes: int
    max_items: int
    max_bytes: int


class Queued(NamedTuple):
    """A frame and the publish timestamp (ms) of the event it carries, if any.

    With `tracker`, the writer sets `tracker.sent_id = event_id` once the
    frame is written (session positions: the last event actually sent).
    A NamedTuple: one is built per event per subscriber, on the hot path.
    """

    frame: bytes
    event_ts: int | None = None
    tracker: SentTracker | None = None
    event_id: StreamId | None = None


class Outbox:
    """Bounded (items and bytes) FIFO of frames for one connection."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._queue: deque[Queued] = deque()
        self._bytes = 0
        self._high_items = 0
        self._high_bytes = 0
        self._readers = trio.lowlevel.ParkingLot()
        self._room = trio.lowlevel.ParkingLot()
        self._closed = False
        self._sealed = False

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def accepting(self) -> bool:
        """False once sealed or closed: new frames are dropped."""
        return not (self._closed or self._sealed)

    def has_room(self, size: int = 0, *, share: float = 1.0) -> bool:
        """Whether a frame of `size` bytes fits within `share` of both limits."""
        max_items = max(1, int(self.max_items * share))
        return len(self._queue) < max_items and (
            self._bytes + size <= self.max_bytes * share or not self._queue
        )

    def put_nowait(
        self,
        frame: bytes,
        event_ts: int | None = None,
        tracker: SentTracker | None = None,
        event_id: StreamId | None = None,
    ) -> bool:
        """Queue a frame; False (nothing queued) when the outbox is full.

        A single frame larger than `max_bytes` is accepted into an empty
        outbox, so one big event cannot wedge a connection forever.
        """
        if self._closed or self._sealed:
            return True  # the connection is going away; drop silently
        queue = self._queue
        queued = len(queue)
        size = len(frame)
        # has_room(size), inlined: this runs once per event per subscriber.
        if queued >= self.max_items or (self._bytes + size > self.max_bytes and queued):
            return False
        queue.append(Queued(frame, event_ts, tracker, event_id))
        self._bytes += size
        if queued >= self._high_items:
            self._high_items = queued + 1
        if self._bytes > self._high_bytes:
            self._high_bytes = self._bytes
        if not queued:
            # The writer parks only on an empty queue.
            self._readers.unpark()
        return True

    async def wait_room(self, size: int = 0, *, share: float = 1.0) -> None:
        """Wait until a frame of `size` bytes fits within `share` of the limits."""
        while not self.has_room(size, share=share) and not self._closed:
            await self._room.park()

    async def get_batch(self, max_bytes: int = 256 * 1024) -> list[Queued]:
        """Wait for at least one frame, then take frames up to `max_bytes`."""
        while not self._queue:
            await self._readers.park()
        batch = [self._queue.popleft()]
        taken = len(batch[0].frame)
        while self._queue and taken + len(self._queue[0].frame) <= max_bytes:
            item = self._queue.popleft()
            taken += len(item.frame)
            batch.append(item)
        self._bytes -= taken
        self._room.unpark_all()
        return batch

    def seal(self) -> None:
        """Refuse (silently drop) new frames; what is queued can still drain."""
        self._sealed = True

    async def wait_empty(self) -> None:
        """Wait until the writer has taken every queued frame."""
        while self._queue and not self._closed:
            await self._room.park()

    def close(self) -> None:
        """Drop everything queued and wake every waiter (synchronous)."""
        self._closed = True
        self._queue.clear()
        self._bytes = 0
        self._room.unpark_all()

    def statistics(self) -> OutboxStatistics:
        return OutboxStatistics(
            items=len(self._queue),
            bytes=self._bytes,
            high_water_items=self._high_items,
            high_water_bytes=self._high_bytes,
            max_items=self.max_items,
            max_bytes=self.max_bytes,
        )
