"""No pong after our own close: a guard on trio-websocket's ping handler.

trio-websocket (0.12 and earlier) answers every `Ping` it reads with a
`Pong`, also after the client has sent its Close frame. wsproto then refuses
the pong (`LocalProtocolError: ... cannot be sent in state LOCAL_CLOSING`),
the library's reader task dies with it and the error escapes the client's
`async with` — a close that should be clean crashes the caller's task tree.
It happens whenever a server ping crosses the client's Close on the wire,
which a heartbeating server makes routine under reconnect storms (upstream:
python-trio/trio-websocket issue #184, fix proposed in pull request #198).

RFC 6455 section 5.5.1: after sending a Close frame an endpoint sends no
further frames, so the right answer to a ping in that state is none. The
guard installs that answer once, at import of `apix_trio.clients.client`,
and only while trio-websocket's handler has the shape it was written for.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio_websocket
import wsproto
import wsproto.events

_PingHandler = Callable[[Any, wsproto.events.Ping], Awaitable[None]]


def _guarded(answer: _PingHandler) -> _PingHandler:
    async def handle_ping(connection: Any, event: wsproto.events.Ping) -> None:
        """Answer `event` only while the connection is open both ways."""
        if connection._wsproto.state is not wsproto.ConnectionState.OPEN:
            return  # our Close is out (or theirs is in): no more frames from us
        await answer(connection, event)

    handle_ping.__apix_pong_guard__ = True  # type: ignore[attr-defined]
    handle_ping.__wrapped__ = answer  # type: ignore[attr-defined]
    return handle_ping


def install() -> bool:
    """Guard `WebSocketConnection`'s ping handler; idempotent.

    Returns whether the guard is in place (False when trio-websocket no
    longer has the private handler it wraps: then it needs none or a new one).
    """
    connection_type = trio_websocket.WebSocketConnection
    answer = getattr(connection_type, "_handle_ping_event", None)
    if answer is None:
        return False
    if getattr(answer, "__apix_pong_guard__", False):
        return True
    connection_type._handle_ping_event = _guarded(answer)  # type: ignore[method-assign,assignment]
    return True
