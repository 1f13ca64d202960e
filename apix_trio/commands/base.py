"""What every op handler shares: the reply types and the permission checks.

A handler takes the connection and one command and returns the reply's
`result` dict, a `Then` (result plus work right after the reply) or a `Later`
(the reply is made outside the op timeout), or raises `OpError`.
`commands.dispatch` turns all of them into exactly one reply frame.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from apix_trio.gateway import auditing
from apix_trio.gateway.connection import Connection
from apix_trio.protocol.codes import CloseCode, ErrorCode
from apix_trio.protocol.ids import BadStreamId, parse_id


class OpError(Exception):
    """A failed reply: `code`, a human `message` and extra `error` fields.

    With `close`, the connection is closed with that code after the reply.
    """

    def __init__(
        self, code: ErrorCode, message: str, *, close: CloseCode | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.close = close
        self.extra = extra


@attrs.frozen
class Then:
    """A result plus work to run right after the reply is queued."""

    result: dict[str, Any]
    after: Callable[[], Awaitable[None]]


@attrs.frozen
class Later:
    """The reply is made by `finish()`, which runs without the op timeout:
    for work paced by the client's reading rather than by the backend (a
    resume's catch-up). Its broker calls keep their own timeouts."""

    finish: Callable[[], Awaitable[dict[str, Any] | Then]]


Handler = Callable[[Connection, Any], Awaitable["dict[str, Any] | Then | Later"]]


_OP_OF_ACTION = {"pub": "publish", "sub": "subscribe"}


def require_channel_access(
    conn: Connection, channel: str, action: str, *, op: str | None = None
) -> None:
    """Raise `forbidden` (audited as `permission.denied` for `op`, by default
    the action's op) unless the token's perms allow `action` on `channel`."""
    assert conn.permissions is not None
    allowed = (
        conn.permissions.can_subscribe(channel)
        if action == "sub"
        else conn.permissions.can_publish(channel)
    )
    if not allowed:
        conn.log.info("forbidden", channel=channel, action=action)
        auditing.permission_denied(conn, op or _OP_OF_ACTION.get(action, action), channel=channel)
        raise OpError(ErrorCode.FORBIDDEN, f"no permission to {action} on {channel}")


def require_subscription_room(conn: Connection) -> None:
    """`limit_exceeded` when the connection already holds
    `limits.max_subscriptions` subscriptions: channels, consumer groups and
    state keys together."""
    taken = len(conn.subscriptions) + conn.hub.groups.count(conn) + len(conn.state_watches)
    if taken >= conn.hub.settings.limits.max_subscriptions:
        raise OpError(ErrorCode.LIMIT_EXCEEDED, "too many subscriptions on this connection")


def check_since(since: str | None) -> None:
    if since is not None:
        try:
            parse_id(since)
        except BadStreamId as exc:
            raise OpError(ErrorCode.BAD_REQUEST, str(exc)) from None


def drop_subscription(conn: Connection, channel: str) -> bool:
    subscription = conn.subscriptions.pop(channel, None)
    if subscription is None:
        return False
    conn.hub.router.remove(conn.org, channel, subscription)
    conn.hub.metrics.subscriptions.dec()
    conn.hub.presence.dropped(conn, channel)  # a leave, queued, if it was a member
    return True
