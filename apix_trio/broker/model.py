"""The broker's vocabulary: errors, retention, publish results and pages.

Every broker interface (`events`, `groups`, `sessions`, `leases`) and every
implementation speaks in these terms; this module imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from apix_trio.protocol.event import Event

__all__ = [
    "TOMBSTONE_GRACE",
    "BrokerError",
    "BrokerUnavailable",
    "ChannelInfo",
    "Event",
    "Listener",
    "Page",
    "Published",
    "Retention",
]

TOMBSTONE_GRACE = 86400.0


class BrokerError(Exception):
    """Base of the broker's own errors."""


class BrokerUnavailable(BrokerError):
    """The backend is down or too slow; the operation may be retried."""


@attrs.frozen
class Retention:
    """How a channel keeps its events (from its namespace) and its keys."""

    history_size: int = 100
    history_ttl: float = 3600.0
    dedupe_window: float = 600.0


@attrs.frozen
class Published:
    event: Event
    duplicate: bool


@attrs.frozen
class Page:
    """Events oldest first, the channel's last id, and whether the read after
    `since` saw every event ever stored after it (always true for
    `read_latest`)."""

    events: tuple[Event, ...]
    position: str
    recovered: bool = True


@attrs.frozen
class ChannelInfo:
    """A channel that retains history: its name and its last id."""

    channel: str
    position: str


Listener = Callable[[str, str, Event], None]
"""`listener(org, channel, event)`: called for every stored event, on every
node, per channel in id order. Must not block or raise."""
