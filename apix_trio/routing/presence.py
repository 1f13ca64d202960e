"""One connection's watch on one channel's presence, and the snapshot seam.

Theory of operation
-------------------
Presence changes arrive at the router like events, as events of the
pseudo-channel `$presence.<channel>` (`broker.presence`), per channel in
position order. The router builds each change's push frame once
(`encode_presence_push`, registered for "$presence") and offers it to every
`PresenceWatch` of that pseudo-channel on this node.

The seam (`subscribe` with `presence: true`), like the replay seam of
`subscriptions`:

1. register the watch with the router first, parked (`park`): changes
   offered now are kept aside, nothing slips past unseen;
2. join, then read the snapshot (members and the position they reflect);
3. reply with the snapshot;
4. `go_live(position)`: deliver the parked changes after the snapshot's
   position, then deliver directly.

Every delivered change advances `last` and anything not after it is
dropped, so a change the snapshot already shows is never pushed, and none
after it is missed (the router sees every change, in order). A change about
the watching connection itself (its own join or leave) is never pushed: its
conn is the event's `key`.

Coalescing: a presence storm (a thousand joins within a second, a thousand
watchers) is a million pushes, and one socket write per push would cost more
than everything else. So a watch does not write its pushes itself: it adds
them to the node's `PresenceOutbox`, and the outbox's flusher (a task of
the presence service, woken by the first push) writes all the pushes a watch
collected meanwhile as one frame batch, one write per connection. The
router hands over a whole bus read (or every join made in one scheduler
round) before the flusher runs, so the busier the node, the larger the
batches. A push is delayed by one scheduler round at most; pushes of one
watch stay in order, and a watch that stopped (`stop`) drops what it had
not written.
"""

from __future__ import annotations

from typing import Protocol

import orjson
import trio

from apix_trio.broker.presence import PRESENCE_PREFIX, presence_channel
from apix_trio.protocol.codec import PushKind
from apix_trio.protocol.event import Event
from apix_trio.protocol.ids import ZERO, StreamId, parse_id

PRESENCE_KIND = PRESENCE_PREFIX.rstrip(".")
"""The router's internal-channel kind of presence changes ("$presence")."""

_PUSH_HEAD = b'{"push":"' + PushKind.PRESENCE.value.encode() + b'","channel":'


def encode_presence_push(pseudo_channel: str, event: Event) -> bytes:
    """`{"push": "presence", "channel", "join"|"leave": member}` as JSON bytes,
    from a change event (its data is `{"join"|"leave": member}`, embedded as
    is: nothing is parsed)."""
    channel = pseudo_channel[len(PRESENCE_PREFIX) :]
    return _PUSH_HEAD + orjson.dumps(channel) + b"," + event.data[1:].encode()


class PresenceSink(Protocol):
    """The connection a watch pushes to (`gateway.connection.Connection`)."""

    @property
    def id(self) -> str: ...

    def enqueue_event(self, frame: bytes, ts: int | None, /) -> None:
        """Write or queue a frame; never blocks (a full outbox closes, 4009)."""
        ...


class PresenceOutbox:
    """Pushes collected per watch until `flush` (see the module docstring)."""

    def __init__(self) -> None:
        self._pending: dict[PresenceWatch, list[bytes]] = {}
        self._wake = trio.Event()

    def add(self, watch: PresenceWatch, frame: bytes) -> None:
        frames = self._pending.get(watch)
        if frames is None:
            self._pending[watch] = [frame]
            self._wake.set()
        else:
            frames.append(frame)

    def flush(self) -> int:
        """Write what every watch collected, one write per watch; returns the
        number of pushes written."""
        pending, self._pending = self._pending, {}
        written = 0
        for watch, frames in pending.items():
            if watch.active:
                watch.conn.enqueue_event(frames[0] if len(frames) == 1 else b"".join(frames), None)
                written += len(frames)
        return written

    async def serve(self) -> None:
        """Flush whenever something was added; never returns."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            self.flush()


class PresenceWatch:
    """See the module docstring. Owned by one connection (through the node's
    presence service), registered with the router under `pseudo_channel`."""

    def __init__(self, conn: PresenceSink, channel: str, outbox: PresenceOutbox) -> None:
        self.conn = conn
        self.channel = channel
        self.pseudo_channel = presence_channel(channel)
        self.outbox = outbox
        self.last: StreamId = ZERO
        self.live = False
        self.active = True
        """False once stopped: pushes not written yet are dropped."""
        self._pending: list[tuple[StreamId, Event, bytes]] = []

    def offer(self, event_id: StreamId, event: Event, frame: bytes) -> None:
        if not self.live:
            self._pending.append((event_id, event, frame))
            return
        self._deliver(event_id, event, frame)

    def _deliver(self, event_id: StreamId, event: Event, frame: bytes) -> None:
        if event_id <= self.last:
            return
        self.last = event_id
        if event.key != self.conn.id:
            self.outbox.add(self, frame)

    def stop(self) -> None:
        """The connection left (or is gone): write nothing more."""
        self.active = False
        self._pending.clear()

    def park(self) -> None:
        """Hold changes back until `go_live` (a snapshot is being read)."""
        self.live = False

    def go_live(self, position: str) -> None:
        """Deliver the parked changes after `position` (the snapshot's), then
        deliver directly."""
        snapshot = parse_id(position)
        if snapshot > self.last:
            self.last = snapshot
        parked, self._pending = self._pending, []
        for item in parked:
            self._deliver(*item)
        self.live = True
