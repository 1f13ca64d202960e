"""Presence ops: the `presence` query, and the presence half of `subscribe`.

`subscribe` with `presence: true` (`commands.channels`) calls
`join_presence` and puts `presence_result` in its reply; the seam itself is
`routing.presence`, the node's bookkeeping `delivery.presence`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from apix_trio.broker.presence import Snapshot
from apix_trio.commands.base import OpError, require_channel_access
from apix_trio.delivery.presence import PresenceFull, PresenceJoin
from apix_trio.gateway.connection import Connection
from apix_trio.protocol import frames as f
from apix_trio.protocol.codes import ErrorCode


def require_presence(conn: Connection, channel: str) -> None:
    """`forbidden` unless the channel's namespace keeps presence."""
    if not conn.hub.namespaces.options(channel).presence:
        raise OpError(ErrorCode.FORBIDDEN, f"presence is not enabled on {channel}")


async def join_presence(conn: Connection, channel: str) -> PresenceJoin:
    """Join `channel`'s presence (the caller checked permission and namespace).

    Error handling: `limit_exceeded` when the channel is full;
    BrokerUnavailable passes through (the dispatcher answers `unavailable`).
    """
    assert conn.identity is not None
    try:
        return await conn.hub.presence.join(
            conn, channel, sub=conn.identity.sub, info=conn.identity.info
        )
    except PresenceFull:
        raise OpError(
            ErrorCode.LIMIT_EXCEEDED,
            f"{channel} has {conn.hub.settings.presence.max_members} members already",
        ) from None


def members_json(snapshot: Snapshot) -> orjson.Fragment:
    """The members as stored (one JSON array), embedded without parsing."""
    return orjson.Fragment(snapshot.members_json)


def presence_result(snapshot: Snapshot) -> dict[str, Any]:
    """The `presence` field of a `subscribe` result."""
    return {"members": members_json(snapshot), "total": snapshot.total}


def then_both(
    first: Callable[[], None], second: Callable[[], Awaitable[None]]
) -> Callable[[], Awaitable[None]]:
    """An `after` that makes presence live, then the event subscription."""

    async def both() -> None:
        first()
        await second()

    return both


async def presence(conn: Connection, command: f.Presence) -> dict[str, Any]:
    """`{"members", "total", "users"}`: needs the subscribe permission, not a
    subscription; `forbidden` on a channel without presence."""
    channel = command.channel
    require_channel_access(conn, channel, "sub")
    require_presence(conn, channel)
    snapshot = await conn.hub.presence.store.members(conn.org, channel, command.limit)
    return {"members": members_json(snapshot), "total": snapshot.total, "users": snapshot.users}
