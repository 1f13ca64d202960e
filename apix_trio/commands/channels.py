"""Channel ops: `subscribe` (live, with `since` replay, or into a group, with
or without presence) and `unsubscribe`. The replay seam itself is
`routing.subscriptions`; presence is `commands.presence`."""

from __future__ import annotations

from typing import Any

from apix_trio.commands.base import (
    Later,
    Then,
    check_since,
    drop_subscription,
    require_channel_access,
    require_subscription_room,
)
from apix_trio.commands.groups import subscribe_group
from apix_trio.commands.presence import (
    join_presence,
    presence_result,
    require_presence,
    then_both,
)
from apix_trio.gateway.connection import Connection
from apix_trio.protocol import frames as f
from apix_trio.routing.subscriptions import ChannelSubscription


async def subscribe(conn: Connection, command: f.Subscribe) -> dict[str, Any] | Then | Later:
    if command.group is not None:
        return await subscribe_group(conn, command, command.group)
    channel = command.channel
    require_channel_access(conn, channel, "sub")
    check_since(command.since)
    if command.presence:
        require_presence(conn, channel)
    existing = conn.subscriptions.get(channel)
    if existing is not None:
        again = {
            "channel": channel,
            "position": existing.position,
            "recovered": True,
            "replayed": 0,
        }
        if not command.presence:
            return again
        # Joining twice is one member; the reply carries a fresh snapshot.
        joined = await join_presence(conn, channel)
        if not existing.presence:
            existing.presence = True
            await conn.hub.sessions.save_now(conn)
        go_live = joined.go_live

        async def presence_live() -> None:
            go_live()

        return Then({**again, "presence": presence_result(joined.snapshot)}, presence_live)
    require_subscription_room(conn)
    subscription = ChannelSubscription(conn, channel)
    conn.subscriptions[channel] = subscription
    conn.hub.router.add(conn.org, channel, subscription)
    conn.hub.metrics.subscriptions.inc()

    async def replay_then_reply() -> Then:
        joined = None
        try:
            if command.presence:
                joined = await join_presence(conn, channel)
                subscription.presence = True
            outcome = await subscription.start(command.since)
        except BaseException:
            drop_subscription(conn, channel)  # and leaves presence, if joined
            raise
        conn.log.info("subscribe", channel=channel, since=command.since, replayed=outcome.replayed)
        await conn.hub.sessions.save_now(conn)
        result = {
            "channel": channel,
            "position": outcome.position,
            "recovered": outcome.recovered,
            "replayed": outcome.replayed,
        }
        if joined is None:
            return Then(result, subscription.go_live)
        result["presence"] = presence_result(joined.snapshot)
        return Then(result, then_both(joined.go_live, subscription.go_live))

    if command.since is None:
        return await replay_then_reply()
    # A replay is paced by the client's reading, not by the backend: it runs
    # outside the op timeout (each broker read keeps its own).
    return Later(replay_then_reply)


async def unsubscribe(conn: Connection, command: f.Unsubscribe) -> dict[str, Any]:
    if command.group is not None:
        if conn.hub.groups.leave(conn, command.channel, command.group):
            await conn.hub.sessions.save_now(conn)
        return {}
    await conn.hub.presence.leave(conn, command.channel)  # awaited: a rejoin comes after
    if drop_subscription(conn, command.channel):
        conn.log.info("unsubscribe", channel=command.channel)
        await conn.hub.sessions.save_now(conn)
    return {}
