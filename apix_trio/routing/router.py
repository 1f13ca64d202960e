"""The event router: (org, channel) -> this node's subscribers.

Theory of operation
-------------------
The broker calls `dispatch` once per stored event, on every node, per channel
in id order. The router looks up the local subscribers of (org, channel) and,
when there are any, encodes the event push once (JSON, then WebSocket frame
bytes) and offers the same bytes to each subscriber. `offer` never blocks: a
subscriber whose outbox is full is closed as a slow consumer by its own
connection, and everybody else is unaffected.

An event for a channel nobody here watches costs one dict lookup.

Orgs starting with `INTERNAL_PREFIX` (`$`, which no token's org can) are the
node's own, e.g. the delivery canary's `$apix`: routed like any other, but
not counted in `statistics()`, which describes client subscriptions.
"""

from __future__ import annotations

from typing import Protocol

import attrs

from apix_trio.protocol.codec import encode_event_push_bytes
from apix_trio.protocol.event import Event
from apix_trio.protocol.ids import StreamId, parse_id
from apix_trio.protocol.wire import text_frame

INTERNAL_PREFIX = "$"


class Subscriber(Protocol):
    def offer(self, event_id: StreamId, event: Event, frame: bytes) -> None:
        """Take one live event of the subscribed channel; never blocks."""


@attrs.frozen
class RouterStatistics:
    channels: int
    subscriptions: int
    dispatched: int
    encoded: int


class Router:
    """Maps (org, channel) to local subscribers and fans events out."""

    def __init__(self) -> None:
        self._subscribers: dict[tuple[str, str], dict[int, Subscriber]] = {}
        self._count = 0
        self._internal: set[tuple[str, str]] = set()  # (org, channel) of internal orgs
        self._dispatched = 0
        self._encoded = 0

    def add(self, org: str, channel: str, subscriber: Subscriber) -> None:
        bucket = self._subscribers.setdefault((org, channel), {})
        if id(subscriber) not in bucket:
            bucket[id(subscriber)] = subscriber
            if org.startswith(INTERNAL_PREFIX):
                self._internal.add((org, channel))
            else:
                self._count += 1

    def remove(self, org: str, channel: str, subscriber: Subscriber) -> None:
        """Forget a subscriber; removing one that is not there is a no-op."""
        bucket = self._subscribers.get((org, channel))
        if bucket is None or bucket.pop(id(subscriber), None) is None:
            return
        if org.startswith(INTERNAL_PREFIX):
            if not bucket:
                self._internal.discard((org, channel))
        else:
            self._count -= 1
        if not bucket:
            del self._subscribers[(org, channel)]

    def has_subscribers(self, org: str, channel: str) -> bool:
        return (org, channel) in self._subscribers

    def dispatch(self, org: str, channel: str, event: Event) -> None:
        """Broker listener: offer one stored event to every local subscriber."""
        self._dispatched += 1
        bucket = self._subscribers.get((org, channel))
        if not bucket:
            return
        self._encoded += 1
        frame = text_frame(encode_event_push_bytes(channel, event))
        event_id = parse_id(event.id)
        # A subscriber may unsubscribe itself (slow consumer) while we iterate.
        for subscriber in list(bucket.values()):
            subscriber.offer(event_id, event, frame)

    def statistics(self) -> RouterStatistics:
        return RouterStatistics(
            channels=len(self._subscribers) - len(self._internal),
            subscriptions=self._count,
            dispatched=self._dispatched,
            encoded=self._encoded,
        )
