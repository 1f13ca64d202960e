"""The WebSocket gateway: handshake checks, then hand the socket to a Connection.

Handshake rules (PROTOCOL.md, Transport and Authentication): a path other than
`server.ws_path` -> 404; an Origin outside `server.allowed_origins` (when set)
-> 403; subprotocols offered without `apix.v1` -> 400; an invalid
`Authorization: Bearer` token -> 401; while shutting down -> 503. None of these
opens a WebSocket.
"""

from __future__ import annotations

import trio

from apix_trio.auth.identity import Identity
from apix_trio.auth.keys import AuthError
from apix_trio.broker.model import BrokerUnavailable
from apix_trio.gateway import auditing
from apix_trio.gateway.connection import Connection, new_connection_id
from apix_trio.gateway.hub import Hub
from apix_trio.gateway.upgrade import UpgradeRequest
from apix_trio.gateway.websocket import HandshakeFailed, ServerWebSocket

SUBPROTOCOL = "apix.v1"
HANDSHAKE_TIMEOUT = 10.0
SEND_TIMEOUT = 10.0


class Rejected(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def check_request(
    hub: Hub, request: UpgradeRequest, *, conn_id: str = "", peer: str = ""
) -> tuple[str | None, Identity | None]:
    """Apply the handshake rules; returns (subprotocol, header identity).

    `conn_id` and `peer` name the would-be connection in audit entries.

    Raises Rejected with the HTTP status to answer.
    """
    server = hub.settings.server
    path = request.target.split("?", 1)[0]
    if path != server.ws_path:
        raise Rejected(404, "not found")
    origin = request.header(b"origin")
    if origin is not None and server.allowed_origins and origin not in server.allowed_origins:
        raise Rejected(403, "origin not allowed")
    subprotocol = None
    if request.subprotocols:
        if SUBPROTOCOL not in request.subprotocols:
            raise Rejected(400, f"unsupported subprotocol; this server speaks {SUBPROTOCOL}")
        subprotocol = SUBPROTOCOL
    if not hub.accepting:
        raise Rejected(503, "server shutting down")
    identity = None
    authorization = request.header(b"authorization")
    if authorization is not None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Rejected(401, "expected Authorization: Bearer <token>")
        try:
            identity = hub.verifier.verify(token.strip(), now=hub.wall())
        except AuthError as exc:
            hub.metrics.auth_failures.labels(reason=exc.reason).inc()
            hub.log.info("auth_failed", reason=exc.reason, via="header")
            auditing.token_refused(hub, exc, conn=conn_id, ip=peer, via="header")
            raise Rejected(401, f"invalid token: {exc}") from None
    return subprotocol, identity


async def _handshake(
    hub: Hub, ws: ServerWebSocket, conn_id: str
) -> tuple[bool, Identity | None, str]:
    """Read and answer the upgrade; (True, identity, peer address) when the
    WebSocket opened.

    With header auth, the org's connection slot is taken before accepting
    (429 when the org is at its cap, 503 when the backend cannot tell).
    """
    with trio.move_on_after(HANDSHAKE_TIMEOUT):
        request = await ws.read_request()
        peer = auditing.peer_address(ws.stream)
        try:
            subprotocol, identity = check_request(hub, request, conn_id=conn_id, peer=peer)
            if identity is not None:
                try:
                    acquired = await hub.slots.acquire(identity.org, conn_id)
                except BrokerUnavailable:
                    raise Rejected(503, "backend unavailable, retry later") from None
                if not acquired:
                    raise Rejected(429, "the organisation is at its connection limit")
                auditing.authenticated(hub, identity, conn=conn_id, ip=peer, via="header")
        except Rejected as exc:
            hub.metrics.handshake_rejections.labels(status=str(exc.status)).inc()
            await ws.reject(exc.status, exc.message + "\n")
            return False, None, peer
        # With header auth the `connected` push follows at once: one write for both.
        await ws.accept(request, subprotocol, with_next_write=identity is not None)
        return True, identity, peer
    return False, None, ""


async def handle_stream(hub: Hub, stream: trio.abc.Stream) -> None:
    """Serve one accepted TCP stream to its end; never raises.

    Resource handling: the stream is closed and any connection slot taken
    for it is released before this returns (the accept loop runs this as
    the stream's task and relies on it: it does not close the stream again).
    The connection's helper tasks run in the nursery this task was started
    in, and `Connection.run` returns only once they are gone.
    """
    try:
        ws = ServerWebSocket(
            stream,
            max_message_bytes=hub.settings.limits.max_message_bytes,
            send_timeout=SEND_TIMEOUT,
        )
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    conn_id = new_connection_id()
    try:
        opened, identity, peer = await _handshake(hub, ws, conn_id)
        if opened:
            conn = Connection(hub, ws, conn_id=conn_id, peer=peer)
            helpers = trio.lowlevel.current_task().parent_nursery
            if helpers is None:  # the root task: no nursery around it to share
                async with trio.open_nursery() as helpers:
                    await conn.run(helpers, header_identity=identity)
            else:
                await conn.run(helpers, header_identity=identity)
    except (HandshakeFailed, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:
        hub.log.exception("connection_crashed")
    finally:
        hub.slots.release(conn_id)
        await ws.aclose()
