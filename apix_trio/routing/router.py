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

Internal channels (names starting with `$`, which no client can use) come
in two kinds. A channel with a handler registered by `handle_internal` (the
control channel of admin disconnects) is handed to that handler, once per
event, when no subscriber is registered. Pseudo-channels with subscribers
(e.g. `$presence.<channel>`) travel the same way as events, in the same
order, but their frames are not event pushes: the router builds the frame
once with the encoder registered for the name's first token
(`set_internal_encoder("$presence", ...)`), or offers an empty frame when
there is none (the subscribers then build their own).

Orgs starting with `INTERNAL_PREFIX` (`$`, which no token's org can) are the
node's own, e.g. the delivery canary's `$apix`: routed like any other, but
not counted in `statistics()`, which describes client subscriptions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import attrs

from apix_trio.protocol.codec import encode_event_push_bytes
from apix_trio.protocol.event import Event
from apix_trio.protocol.ids import StreamId, parse_id
from apix_trio.protocol.wire import text_frame

INTERNAL_PREFIX = "$"
"""Channels starting with this are internal (see the module docstring)."""

InternalEncoder = Callable[[str, Event], bytes]
"""`encoder(pseudo_channel, event)` -> the JSON bytes of the push to send."""


class Subscriber(Protocol):
    def offer(self, event_id: StreamId, event: Event, frame: bytes) -> None:
        """Take one live event of the subscribed channel; never blocks."""


InternalHandler = Callable[[str, Event], None]
"""`handler(org, event)` for an internal channel's events; must not block or raise."""


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
        self._handlers: dict[str, InternalHandler] = {}
        self._encoders: dict[str, InternalEncoder] = {}

    def handle_internal(self, channel: str, handler: InternalHandler) -> None:
        """Send the events of internal `channel` (it starts with `$`) to `handler`."""
        if not channel.startswith("$"):
            raise ValueError(f"internal channel names start with '$', not {channel!r}")
        self._handlers[channel] = handler

    def subscriber_count(self, org: str, channel: str) -> int:
        """Local subscribers of (org, channel)."""
        return len(self._subscribers.get((org, channel), ()))

    def channels_of(self, org: str) -> list[str]:
        """Channels of `org` with local subscribers (a scan: for admin reads)."""
        return [
            channel
            for owner, channel in self._subscribers
            if owner == org and not channel.startswith(INTERNAL_PREFIX)
        ]

    def set_internal_encoder(self, kind: str, encoder: InternalEncoder) -> None:
        """Build the frames of pseudo-channels `<kind>.<...>` with `encoder`
        (`kind` includes the `$`, e.g. "$presence")."""
        self._encoders[kind] = encoder

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
            if channel[:1] == "$":
                handler = self._handlers.get(channel)
                if handler is not None:
                    handler(org, event)
            return
        self._encoded += 1
        if channel.startswith(INTERNAL_PREFIX):
            encoder = self._encoders.get(channel.partition(".")[0])
            frame = b"" if encoder is None else text_frame(encoder(channel, event))
        else:
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
