"""Event ops: `publish` (stored before the reply) and `history`."""

from __future__ import annotations

from typing import Any

import trio

from apix_trio.commands.base import OpError, check_since, require_channel_access
from apix_trio.gateway import auditing
from apix_trio.gateway.connection import Connection
from apix_trio.protocol import frames as f
from apix_trio.protocol.codec import encode_event
from apix_trio.protocol.codes import ErrorCode


async def publish(conn: Connection, command: f.Publish) -> dict[str, Any]:
    channel = command.channel
    require_channel_access(conn, channel, "pub")
    hub = conn.hub
    if not hub.namespaces.options(channel).client_publish:
        auditing.permission_denied(conn, "publish", channel=channel)
        raise OpError(ErrorCode.FORBIDDEN, f"clients may not publish on {channel}")
    published = await hub.broker.publish(
        conn.org,
        channel,
        command.data,
        sender=conn.sub,
        key=command.key,
        retention=hub.namespaces.retention(channel),
    )
    if published.duplicate:
        hub.metrics.duplicates.inc()
    else:
        hub.metrics.published.inc()
    event = published.event
    hub.latency.acked(conn.org, (trio.current_time() - conn.received_at) * 1000)
    return {"id": event.id, "ts": event.ts, "duplicate": published.duplicate}


async def history(conn: Connection, command: f.History) -> dict[str, Any]:
    channel = command.channel
    require_channel_access(conn, channel, "sub", op="history")
    check_since(command.since)
    hub = conn.hub
    retention = hub.namespaces.retention(channel)
    if command.since is not None:
        page = await hub.broker.read_after(
            conn.org, channel, command.since, command.limit, retention
        )
    else:
        page = await hub.broker.read_latest(conn.org, channel, command.limit, retention)
    return {
        "events": [encode_event(event) for event in page.events],
        "position": page.position,
    }
