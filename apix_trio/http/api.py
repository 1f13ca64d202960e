"""The internal HTTP API (an ASGI app served by hypercorn on trio).

Routes:
- `GET /api/v1/health`: 200 while the process serves.
- `GET /api/v1/ready`: 200 when the broker answers and connections are
  accepted, else 503 (load balancers stop sending new clients).
- `GET /metrics`: Prometheus text format.
- `GET /api/v1/stats`: JSON snapshot of connections, router and outboxes.
- `POST /api/v1/publish`: server-side publish, `Authorization: Bearer <JWT>`
  with role `admin`; the event goes to the token's own org.
- `POST /api/v1/disconnect`: close a connection of the admin's org with 4030.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from apix_trio.auth.identity import Identity
from apix_trio.auth.keys import AuthError
from apix_trio.broker.model import BrokerUnavailable
from apix_trio.gateway.hub import Hub
from apix_trio.protocol.codes import CloseCode
from apix_trio.protocol.names import InvalidName, check_channel

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
MAX_BODY = 1024 * 1024


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def _respond(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _json(send: Send, status: int, payload: Any) -> None:
    await _respond(send, status, orjson.dumps(payload), b"application/json")


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    size = 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise HttpError(413, "body too large")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def make_app(hub: Hub) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The ASGI app for `hub`."""

    def admin(scope: Scope) -> Identity:
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HttpError(401, "expected Authorization: Bearer <token>")
        try:
            identity = hub.verifier.verify(token.strip(), now=hub.wall())
        except AuthError as exc:
            raise HttpError(401, f"invalid token: {exc}") from None
        if "admin" not in identity.roles:
            raise HttpError(403, "the admin role is required")
        return identity

    async def publish(scope: Scope, receive: Receive) -> tuple[int, Any]:
        identity = admin(scope)
        try:
            body = orjson.loads(await _read_body(receive))
            channel = body["channel"]
            check_channel(channel)
            data = orjson.dumps(body["data"]).decode()
            key = body.get("key")
            if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= 128):
                raise HttpError(400, "key must be a string of 1-128 characters")
        except (orjson.JSONDecodeError, KeyError, TypeError, InvalidName) as exc:
            raise HttpError(400, f"expected {{channel, data, key?}}: {exc}") from None
        try:
            published = await hub.broker.publish(
                identity.org,
                channel,
                data,
                sender=identity.sub,
                key=key,
                retention=hub.namespaces.retention(channel),
            )
        except BrokerUnavailable:
            raise HttpError(503, "backend unavailable, retry later") from None
        hub.metrics.published.inc()
        event = published.event
        return 200, {"id": event.id, "ts": event.ts, "duplicate": published.duplicate}

    async def disconnect(scope: Scope, receive: Receive) -> tuple[int, Any]:
        identity = admin(scope)
        try:
            conn_id = orjson.loads(await _read_body(receive))["conn"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise HttpError(400, f"expected {{conn}}: {exc}") from None
        conn = hub.registry.get(str(conn_id))
        if conn is None or conn.identity is None or conn.identity.org != identity.org:
            raise HttpError(404, "no such connection")
        conn.request_close(CloseCode.ADMIN_DISCONNECT)
        return 200, {}

    def stats() -> dict[str, Any]:
        router = hub.router.statistics()
        return {
            "node": hub.settings.server.node_id,
            "connections": len(hub.registry),
            "channels": router.channels,
            "subscriptions": router.subscriptions,
            "dispatched": router.dispatched,
            "broker_ready": hub.broker.ready,
            "accepting": hub.accepting,
        }

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        try:
            if path == "/api/v1/health" and method == "GET":
                await _json(send, 200, {"status": "ok", "node": hub.settings.server.node_id})
            elif path == "/api/v1/ready" and method == "GET":
                ready, reason = hub.readiness()
                payload = {"ready": ready, "node": hub.settings.server.node_id, "reason": reason}
                await _json(send, 200 if ready else 503, payload)
            elif path == "/metrics" and method == "GET":
                await _respond(send, 200, hub.metrics.render(), b"text/plain; version=0.0.4")
            elif path == "/api/v1/stats" and method == "GET":
                await _json(send, 200, stats())
            elif path == "/api/v1/publish" and method == "POST":
                status, payload = await publish(scope, receive)
                await _json(send, status, payload)
            elif path == "/api/v1/disconnect" and method == "POST":
                status, payload = await disconnect(scope, receive)
                await _json(send, status, payload)
            else:
                raise HttpError(404, "not found")
        except HttpError as exc:
            await _json(send, exc.status, {"error": exc.message})

    return app
