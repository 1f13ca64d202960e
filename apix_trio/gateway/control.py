"""The control channel: admin disconnects carried out on every node.

An admin disconnect (`POST /api/v1/disconnect`) closes the matching
connections of this node at once, then publishes one control message to the
org's internal channel `$control` (a name no client can subscribe or publish
to: `$` is outside the channel syntax). The broker fans it out like any
event (Redis: the bus, to every node), and each node's router hands it to
`ControlChannel.handle` (`Router.handle_internal`), which closes that node's
matching connections of that org with 4030. Nothing is retained
(`history_size` 0), so the message is not replayed to anybody later.

Message: `{"type": "disconnect", "sub"?, "conn"?, "reason"?, "node"}`.
"""

from __future__ import annotations

import orjson

from apix_trio.broker.events import Broker
from apix_trio.broker.model import Retention
from apix_trio.gateway.registry import ConnectionRegistry, Registered
from apix_trio.observability.logs import get_logger
from apix_trio.protocol.codes import CloseCode
from apix_trio.protocol.event import Event

CONTROL_CHANNEL = "$control"
CONTROL_RETENTION = Retention(history_size=0, history_ttl=60.0, dedupe_window=0.0)
MAX_REASON_BYTES = 123
"""A WebSocket close reason holds at most 123 bytes of UTF-8."""

log = get_logger("apix.control")


def close_reason(reason: str | None) -> str | None:
    """`reason` cut to what a close frame can carry (whole characters only)."""
    if reason is None:
        return None
    return reason.encode()[:MAX_REASON_BYTES].decode("utf-8", "ignore")


class ControlChannel:
    """See the module docstring. One per node."""

    def __init__(self, broker: Broker, registry: ConnectionRegistry, node_id: str) -> None:
        self._broker = broker
        self._registry = registry
        self._node_id = node_id

    def close_local(
        self, org: str, *, sub: str | None, conn: str | None, reason: str | None
    ) -> int:
        """Close this node's connections of `org` matching `sub` or `conn`
        with 4030; returns how many were open and are now closing."""
        if conn is not None:
            found = self._registry.get(conn)
            candidates: list[Registered] = [] if found is None else [found]
        else:
            candidates = list(self._registry)
        closed = 0
        for candidate in candidates:
            identity = candidate.identity
            if identity is None or identity.org != org:
                continue
            if sub is not None and identity.sub != sub:
                continue
            if getattr(candidate, "closing", False):
                continue
            candidate.request_close(CloseCode.ADMIN_DISCONNECT, close_reason(reason))
            closed += 1
        if closed:
            log.info("admin_disconnect", org=org, sub=sub, conn=conn, closed=closed)
        return closed

    async def publish_disconnect(
        self, org: str, *, sub: str | None, conn: str | None, reason: str | None, sender: str
    ) -> None:
        """Ask every node to close `org`'s matching connections.

        Error handling: BrokerUnavailable when the message cannot be stored.
        """
        message = {"type": "disconnect", "sub": sub, "conn": conn, "reason": reason}
        message["node"] = self._node_id
        await self._broker.publish(
            org,
            CONTROL_CHANNEL,
            orjson.dumps(message).decode(),
            sender=sender,
            key=None,
            retention=CONTROL_RETENTION,
        )

    def handle(self, org: str, event: Event) -> None:
        """The router's handler for `$control` (never raises)."""
        try:
            message = orjson.loads(event.data)
            if message.get("type") == "disconnect":
                self.close_local(
                    org,
                    sub=message.get("sub"),
                    conn=message.get("conn"),
                    reason=message.get("reason"),
                )
            else:
                log.warning("control_unknown", org=org, id=event.id)
        except (orjson.JSONDecodeError, AttributeError, TypeError):
            log.error("control_bad_message", org=org, id=event.id)
