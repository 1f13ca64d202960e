"""Old import path, kept for existing code: everything public of
`apix_trio.clients.client` (where the client now lives)."""

from apix_trio.clients.client import (
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_OUTBOX_SIZE,
    DEFAULT_PUSH_BUFFER,
    DEFAULT_SUBPROTOCOL,
    ApixClientError,
    ApixClosed,
    ApixConnectError,
    ApixError,
    Client,
    EventOps,
    Frame,
    open_client,
)

__all__ = [
    "DEFAULT_CLOSE_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_OUTBOX_SIZE",
    "DEFAULT_PUSH_BUFFER",
    "DEFAULT_SUBPROTOCOL",
    "ApixClientError",
    "ApixClosed",
    "ApixConnectError",
    "ApixError",
    "Client",
    "EventOps",
    "Frame",
    "open_client",
]
