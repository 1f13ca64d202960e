"""Consumer-group ops: joining a group (`subscribe` with `group`) and `ack`
(docs/groups.md). Delivery itself is `delivery.groups` and `delivery.group_reader`."""

from __future__ import annotations

from typing import Any

from apix_trio.broker.groups import dead_letter_channel
from apix_trio.commands.base import OpError, require_channel_access, require_subscription_room
from apix_trio.delivery.groups import NotAMember
from apix_trio.gateway.connection import Connection
from apix_trio.protocol import frames as f
from apix_trio.protocol.codes import ErrorCode
from apix_trio.protocol.names import is_channel


async def subscribe_group(conn: Connection, command: f.Subscribe, group: str) -> dict[str, Any]:
    """Join `group` on the channel (docs/groups.md); a member already gets a no-op."""
    channel = command.channel
    require_channel_access(conn, channel, "sub")
    if command.since is not None:
        raise OpError(ErrorCode.BAD_REQUEST, "since cannot be combined with group")
    if command.presence:
        raise OpError(ErrorCode.BAD_REQUEST, "presence cannot be combined with group")
    hub = conn.hub
    if hub.namespaces.retention(channel).history_size < 1:
        raise OpError(ErrorCode.BAD_REQUEST, f"{channel} keeps no history, which groups need")
    if not is_channel(dead_letter_channel(channel)):
        raise OpError(
            ErrorCode.BAD_REQUEST, f"{channel} is too long for a group: {channel}.dlq is no channel"
        )
    if not hub.groups.is_member(conn, channel, group):
        require_subscription_room(conn)
        await hub.groups.join(conn, channel, group)
        await hub.sessions.save_now(conn)
    position = await hub.broker.position(conn.org, channel)
    return {"channel": channel, "position": position, "recovered": True, "replayed": 0}


async def ack(conn: Connection, command: f.Ack) -> dict[str, Any]:
    """Group-wide ack by a member of the group; counts what was pending."""
    require_channel_access(conn, command.channel, "sub", op="ack")
    try:
        acked = await conn.hub.groups.ack(conn, command.channel, command.group, command.ids)
    except NotAMember as exc:
        raise OpError(ErrorCode.NOT_FOUND, str(exc)) from None
    return {"acked": acked}
