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

The connection drains the queue with `take_batch`, which takes every queued
frame up to a byte budget at once, so a burst of events costs one socket
write instead of one per frame: the node's write coalescer
(`gateway/coalesce.py`) for a socket that takes the data, else a writer task
the connection starts only while something is waiting to be written.
`push_front` puts back what a short write left over, ahead of everything
else. `put_control` queues a control frame (ping, pong) outside the limits:
a few bytes that must keep their place between data frames.

A plain list is used rather than a trio memory channel because the queue
must account bytes as well as items and hand out whole batches, and rather
than a deque because it is what an idle connection keeps (an empty list is
56 bytes, an empty deque 760) and because the common batch is the whole
queue, handed out as it is with a fresh empty list put in its place. Only a
batch cut short by its byte budget, or a short write put back, moves items
within the list (rare, and bounded by the outbox limits). The parking lot
for waiters is made only when somebody waits (most outboxes never see one).
"""

from __future__ import annotations

from typing import TypeAlias

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


Queued: TypeAlias = tuple[bytes, int | None, SentTracker | None, StreamId | None]
"""A queued frame: (frame bytes, publish timestamp in ms of the event it
carries or None, tracker or None, event id or None).

With a tracker, the writer sets `tracker.sent_id = event_id` once the frame
is written (session positions: the last event actually sent). A plain
tuple: one is built per event per subscriber on the hot path, and a
NamedTuple's constructor costs seven times as much."""


class Outbox:
    """Bounded (items and bytes) FIFO of frames for one connection."""

    __slots__ = (
        "_bytes",
        "_closed",
        "_high_bytes",
        "_high_items",
        "_queue",
        "_room",
        "_sealed",
        "max_bytes",
        "max_items",
    )

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._queue: list[Queued] = []
        self._bytes = 0
        self._high_items = 0
        self._high_bytes = 0
        self._room: trio.lowlevel.ParkingLot | None = None
        self._closed = False
        self._sealed = False

    def _room_lot(self) -> trio.lowlevel.ParkingLot:
        if self._room is None:
            self._room = trio.lowlevel.ParkingLot()
        return self._room

    def _wake_room(self) -> None:
        if self._room is not None:
            self._room.unpark_all()

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
        queue.append((frame, event_ts, tracker, event_id))
        self._bytes += size
        if queued >= self._high_items:
            self._high_items = queued + 1
        if self._bytes > self._high_bytes:
            self._high_bytes = self._bytes
        return True

    def put_control(self, frame: bytes) -> None:
        """Queue a control frame (ping, pong) whatever the limits; dropped
        once closed."""
        if self._closed:
            return
        self._queue.append((frame, None, None, None))
        self._bytes += len(frame)

    async def wait_room(self, size: int = 0, *, share: float = 1.0) -> None:
        """Wait until a frame of `size` bytes fits within `share` of the limits."""
        while not self.has_room(size, share=share) and not self._closed:
            await self._room_lot().park()

    def take_batch(self, max_bytes: int = 256 * 1024) -> list[Queued]:
        """Take queued frames, oldest first, up to `max_bytes` (at least one,
        if any). The caller owns the list returned."""
        queue = self._queue
        if not queue:
            return []
        if self._bytes <= max_bytes:  # everything fits: hand the queue over
            self._queue = []
            self._bytes = 0
            self._wake_room()
            return queue
        taken = len(queue[0][0])
        end = 1
        while end < len(queue) and taken + len(queue[end][0]) <= max_bytes:
            taken += len(queue[end][0])
            end += 1
        batch = queue[:end]
        del queue[:end]
        self._bytes -= taken
        self._wake_room()
        return batch

    def push_front(self, items: list[Queued]) -> None:
        """Put back what a short write left over, ahead of everything queued."""
        if self._closed:
            return
        self._queue[:0] = items
        self._bytes += sum(len(item[0]) for item in items)

    def seal(self) -> None:
        """Refuse (silently drop) new frames; what is queued can still drain."""
        self._sealed = True

    async def wait_empty(self) -> None:
        """Wait until every queued frame has been taken for writing."""
        while self._queue and not self._closed:
            await self._room_lot().park()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Drop everything queued and wake every waiter (synchronous)."""
        self._closed = True
        self._queue = []
        self._bytes = 0
        self._wake_room()

    def statistics(self) -> OutboxStatistics:
        return OutboxStatistics(
            items=len(self._queue),
            bytes=self._bytes,
            high_water_items=self._high_items,
            high_water_bytes=self._high_bytes,
            max_items=self.max_items,
            max_bytes=self.max_bytes,
        )
