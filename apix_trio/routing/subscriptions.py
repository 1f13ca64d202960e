"""One connection's subscription to one channel, and the replay-then-live seam.

Theory of operation
-------------------
A subscription is registered with the router *before* anything is read from
the broker, so no live event can slip past unseen. Until it goes live, events
the router offers are parked in `_pending`. History is then read in pages
after `since` (waiting for outbox room between frames, so a long catch-up is
back-pressured instead of tripping the slow-consumer close). Going live first
flushes the parked events newer than the last replayed one, then flips to
direct delivery.

Every delivered event advances `last_id`; anything not newer than `last_id`
is dropped, which is what makes the seam free of duplicates. Ids of one
channel arrive from the broker in order, which is what makes it free of gaps.

If the parked list grows past `PENDING_LIMIT` during a long replay it is
dropped and the replay reads more pages instead: every parked event is also
in the channel's history, because the broker stores before it fans out.

Replayed and parked frames wait for room within `REPLAY_SHARE` of the outbox
limits, leaving the rest for live events of the connection's other channels
(a resume restores several channels one after the other, and the first ones
may be live while a later one replays).

`sent_id` is the session position (`apix_trio.delivery.sessions`): the id of the last
event of this channel the writer put on the socket, or where the subscription
started (`since`, else `position`) before it sent any. Every event frame
carries this subscription as its outbox `tracker`.
"""

from __future__ import annotations

from typing import Protocol

import attrs

from apix_trio.broker.events import Broker
from apix_trio.protocol.codec import encode_event_push_bytes
from apix_trio.protocol.event import Event
from apix_trio.protocol.ids import ZERO, StreamId, format_id, parse_id
from apix_trio.protocol.wire import text_frame
from apix_trio.routing.namespaces import Namespaces


class SentTracker(Protocol):
    """Whoever wants to know the last event id written to the socket."""

    sent_id: StreamId


class RoomGate(Protocol):
    """A connection's outbox, as a replay waits for room in it."""

    async def wait_room(self, size: int = 0, *, share: float = 1.0) -> None: ...


class ChannelServices(Protocol):
    """The node's services a subscription reads: the broker and the namespaces."""

    @property
    def broker(self) -> Broker: ...

    @property
    def namespaces(self) -> Namespaces: ...


class EventSink(Protocol):
    """Where event frames go: a connection's `enqueue_event` writes or queues
    one and never blocks (a full outbox closes the connection, 4009);
    `tracker.sent_id` becomes `event_id` once the frame is on the socket."""

    def enqueue_event(
        self,
        frame: bytes,
        ts: int | None,
        tracker: SentTracker | None = None,
        event_id: StreamId | None = None,
    ) -> None: ...


class SubscriptionOwner(EventSink, Protocol):
    """The connection a subscription delivers to (`gateway.connection.Connection`
    satisfies it): routing sits below the gateway and holds only this."""

    @property
    def org(self) -> str: ...

    @property
    def hub(self) -> ChannelServices: ...

    @property
    def outbox(self) -> RoomGate: ...

REPLAY_PAGE = 500
PENDING_LIMIT = 10_000
REPLAY_SHARE = 0.5


@attrs.frozen
class ReplayOutcome:
    position: str
    recovered: bool
    replayed: int


class ChannelSubscription:
    """See the module docstring. Owned by one connection."""

    def __init__(self, conn: SubscriptionOwner, channel: str) -> None:
        self.conn = conn
        self.channel = channel
        self.last_id: StreamId = ZERO
        self.sent_id: StreamId = ZERO
        self.positioned = False
        """True once `sent_id` means something (`start` set the starting point)."""
        self.live = False
        self._pending: list[tuple[StreamId, Event, bytes]] = []
        self._overflowed = False

    @property
    def position(self) -> str:
        return format_id(self.last_id)

    def offer(self, event_id: StreamId, event: Event, frame: bytes) -> None:
        if not self.live:
            if len(self._pending) < PENDING_LIMIT:
                self._pending.append((event_id, event, frame))
            else:
                self._pending.clear()
                self._overflowed = True
            return
        if event_id <= self.last_id:
            return
        self.last_id = event_id
        self.conn.enqueue_event(frame, event.ts, self, event_id)

    async def start(self, since: str | None) -> ReplayOutcome:
        """Read the position (no `since`) or replay history after `since`.

        The caller must already have registered this subscription with the
        router, and must call `go_live` after answering the client.
        """
        if since is None:
            position = await self.conn.hub.broker.position(self.conn.org, self.channel)
            self.last_id = self.sent_id = parse_id(position)
            self.positioned = True
            return ReplayOutcome(position, True, 0)
        self.last_id = self.sent_id = parse_id(since)
        self.positioned = True
        return await self._catch_up()

    async def _catch_up(self) -> ReplayOutcome:
        """Deliver history pages after `last_id` until a short page."""
        hub = self.conn.hub
        retention = hub.namespaces.retention(self.channel)
        recovered: bool | None = None
        replayed = 0
        while True:
            self._overflowed = False
            page = await hub.broker.read_after(
                self.conn.org, self.channel, format_id(self.last_id), REPLAY_PAGE, retention
            )
            if recovered is None:
                recovered = page.recovered
            for event in page.events:
                event_id = parse_id(event.id)
                if event_id <= self.last_id:
                    continue
                frame = text_frame(encode_event_push_bytes(self.channel, event))
                await self.conn.outbox.wait_room(len(frame), share=REPLAY_SHARE)
                self.last_id = event_id
                self.conn.enqueue_event(frame, event.ts, self, event_id)
                replayed += 1
            if len(page.events) < REPLAY_PAGE and not self._overflowed:
                return ReplayOutcome(page.position, bool(recovered), replayed)

    async def go_live(self) -> None:
        """Deliver the parked events newer than `last_id`, then go live."""
        while True:
            parked, self._pending = self._pending, []
            for event_id, event, frame in parked:
                if event_id <= self.last_id:
                    continue
                await self.conn.outbox.wait_room(len(frame), share=REPLAY_SHARE)
                self.last_id = event_id
                self.conn.enqueue_event(frame, event.ts, self, event_id)
            if self._overflowed:
                await self._catch_up()
            elif not self._pending:
                break
        self.live = True
