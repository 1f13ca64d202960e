"""Old import path, kept for existing code: everything public of
`apix_trio.clients.reconnect` (where the reconnect now lives)."""

from apix_trio.clients.reconnect import (
    DEFAULT_BACKOFF_BASE,
    DEFAULT_BACKOFF_CAP,
    DEFAULT_BUFFER,
    Item,
    PresenceSnapshot,
    ReconnectingClient,
    ReconnectStatistics,
    Resync,
    StateSnapshot,
    StateSubscriptionFailed,
    SubscriptionFailed,
    TokenProvider,
    TokenUnavailable,
    open_reconnecting_client,
)

__all__ = [
    "DEFAULT_BACKOFF_BASE",
    "DEFAULT_BACKOFF_CAP",
    "DEFAULT_BUFFER",
    "Item",
    "PresenceSnapshot",
    "ReconnectStatistics",
    "ReconnectingClient",
    "Resync",
    "StateSnapshot",
    "StateSubscriptionFailed",
    "SubscriptionFailed",
    "TokenProvider",
    "TokenUnavailable",
    "open_reconnecting_client",
]
