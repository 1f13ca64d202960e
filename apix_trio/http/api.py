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
- Web pages (`apix_trio/web/pages.py`): `GET /demo`, `/dashboard`,
  `/client/apix.js`, `/client/apix.d.ts`, `/web/*` assets; `POST /dev/token`
  (development key pair only, else 404).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from apix_trio.auth.identity import Identity
from apix_trio.auth.keys import AuthError
from apix_trio.broker.model import BrokerUnavailable
from apix_trio.gateway.hub import Hub
from apix_trio.observability.logs import get_logger
from apix_trio.protocol.codes import CloseCode
from apix_trio.protocol.names import InvalidName, check_channel
from apix_trio.web import pages as web_pages

_log = get_logger("apix.http")
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


async def _send_web(send: Send, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """A 200 answer of the web pages block (see `make_app`)."""
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


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

    # -- web pages (apix_trio/web/pages.py) --------------------------------------
    # The demo, the dashboard, the JS client and the dev-only token endpoint.
    # Mounted here until the HTTP layer's rewrite: port `dev_token`, `_send_web`
    # and the two `elif` lines marked "web pages" below as they are.

    async def dev_token(receive: Receive) -> bytes:
        if not hub.verifier.keys.dev_mode:
            raise HttpError(404, "not found")  # exists only on the development key pair
        try:
            request = web_pages.parse_dev_token_request(await _read_body(receive))
        except web_pages.DevTokenError as exc:
            raise HttpError(400, str(exc)) from None
        try:
            minted = web_pages.mint_dev_token(
                hub.settings.auth, hub.settings.server, request, now=hub.wall()
            )
        except (OSError, ValueError) as exc:
            _log.error("dev_token_failed", exception=type(exc).__name__)
            raise HttpError(500, "cannot sign a development token") from None
        _log.info("dev_token", org=minted["org"], sub=minted["sub"], roles=minted["roles"])
        return orjson.dumps(minted)

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
                ready = hub.broker.ready and hub.accepting
                payload = {"ready": ready, "broker": hub.broker.ready, "accepting": hub.accepting}
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
            elif (page := web_pages.find_page(path)) is not None and method == "GET":  # web pages
                await _send_web(send, page.headers(), page.body())
            elif path == web_pages.DEV_TOKEN_PATH and method == "POST":  # web pages
                await _send_web(send, web_pages.DEV_TOKEN_HEADERS, await dev_token(receive))
            else:
                raise HttpError(404, "not found")
        except HttpError as exc:
            await _json(send, exc.status, {"error": exc.message})

    return app
