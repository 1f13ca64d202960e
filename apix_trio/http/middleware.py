"""What every HTTP response gets, as one plain ASGI middleware around the app.

In order, for each request:

1. `X-Request-Id`: the request's own when it sent a sane one (1-128 of
   `[A-Za-z0-9._:-]`), else a fresh one; echoed on the response and in the
   access log line.
2. CORS: a request whose `Origin` is allowed (`server.allowed_origins`, or
   any when the list is empty) gets `Access-Control-Allow-Origin` (the
   origin itself) and `Vary: Origin`; a preflight (`OPTIONS` with `Origin`
   and `Access-Control-Request-Method`) is answered here: 204 with the
   allowed methods and headers, or 403 `forbidden` for another origin.
3. The body limit (`api.max_body_bytes`): a `Content-Length` over it is
   answered 413 before any of the body is read; a body without one is
   counted while it streams and cut off at the limit (`BodyTooLarge`, an
   `ApiError` the app answers 413).
4. Headers: `X-Content-Type-Options: nosniff` on everything,
   `Cache-Control: no-store` on everything except the docs page's static
   assets.
5. Failures: an exception that escapes the app is logged with its
   traceback (JSON) and answered 500 `internal` when nothing was sent yet;
   never a traceback on the wire.
6. One access log line (`http_request`) with method, path, status,
   duration, request id and, once authenticated, `org` and `sub`.

Plain ASGI rather than Starlette's `BaseHTTPMiddleware`: no extra task or
stream per request on the hot path.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from apix_trio.http.errors import ApiError, error_body
from apix_trio.observability.logs import get_logger
from apix_trio.protocol.codes import ErrorCode

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_RE = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
ASSETS_PREFIX = "/api/docs/assets/"
ALLOW_METHODS = b"GET, POST, PUT, PATCH, DELETE, OPTIONS"
ALLOW_HEADERS = b"Authorization, Content-Type, X-Request-Id"
EXPOSE_HEADERS = b"X-Request-Id, Retry-After"
PREFLIGHT_MAX_AGE = b"600"

log = get_logger("apix.http")


_PROCESS_TAG = os.urandom(4).hex()
_request_numbers = itertools.count(1)


def new_request_id() -> bytes:
    """A process-unique id (random per process, then a counter): no syscall per request."""
    return b"%s-%x" % (_PROCESS_TAG.encode(), next(_request_numbers))


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(ErrorCode.TOO_LARGE, f"the request body is larger than {limit} bytes")


class ApiMiddleware:
    """See the module docstring."""

    def __init__(
        self, app: ASGIApp, *, allowed_origins: tuple[str, ...], max_body_bytes: int
    ) -> None:
        self.app = app
        self.allowed = frozenset(origin.encode() for origin in allowed_origins)
        self.max_body = max_body_bytes

    def _origin_allowed(self, origin: bytes) -> bool:
        return not self.allowed or origin in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started_at = time.perf_counter()
        headers = scope["headers"]
        request_id = origin = preflight = length = None
        for name, value in headers:
            if name == b"x-request-id":
                request_id = value if REQUEST_ID_RE.fullmatch(value) else None
            elif name == b"origin":
                origin = value
            elif name == b"access-control-request-method":
                preflight = value
            elif name == b"content-length":
                length = value
        if request_id is None:
            request_id = new_request_id()
        cors = origin is not None and self._origin_allowed(origin)
        path: str = scope["path"]
        extra: list[tuple[bytes, bytes]] = [
            (b"x-request-id", request_id),
            (b"x-content-type-options", b"nosniff"),
        ]
        if not path.startswith(ASSETS_PREFIX):
            extra.append((b"cache-control", b"no-store"))
        if cors:
            assert origin is not None
            extra += [
                (b"access-control-allow-origin", origin),
                (b"access-control-expose-headers", EXPOSE_HEADERS),
                (b"vary", b"Origin"),
            ]
        status = 0

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        try:
            if scope["method"] == "OPTIONS" and origin is not None and preflight is not None:
                await self._preflight(cors, send_with_headers)
            elif length is not None and _too_long(length, self.max_body):
                await _send_error(
                    send_with_headers, 413, ErrorCode.TOO_LARGE,
                    f"the request body is larger than {self.max_body} bytes",
                )  # fmt: skip
            else:
                await self.app(scope, self._limited(receive), send_with_headers)
        except Exception as exc:
            if not isinstance(exc, ApiError):
                log.exception("http_failed", method=scope["method"], path=path)
            if not status:
                if isinstance(exc, ApiError):
                    body = error_body(exc.code, exc.message, **exc.extra)
                    await _send_json(send_with_headers, exc.status, body)
                else:
                    await _send_error(send_with_headers, 500, ErrorCode.INTERNAL, "internal error")
        finally:
            fields = scope.get("state") or {}
            log.info(
                "http_request",
                method=scope["method"],
                path=path,
                status=status,
                ms=round((time.perf_counter() - started_at) * 1000, 3),
                request_id=request_id.decode(),
                org=fields.get("apix_org"),
                sub=fields.get("apix_sub"),
            )

    async def _preflight(self, allowed: bool, send: Send) -> None:
        if not allowed:
            await _send_error(send, 403, ErrorCode.FORBIDDEN, "origin not allowed")
            return
        await send(
            {
                "type": "http.response.start",
                "status": 204,
                "headers": [
                    (b"access-control-allow-methods", ALLOW_METHODS),
                    (b"access-control-allow-headers", ALLOW_HEADERS),
                    (b"access-control-max-age", PREFLIGHT_MAX_AGE),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    def _limited(self, receive: Receive) -> Receive:
        limit = self.max_body
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        return limited_receive


def _too_long(length: bytes, limit: int) -> bool:
    try:
        return int(length) > limit
    except ValueError:
        return False  # h11 refuses a malformed Content-Length before we see it


async def _send_json(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Send, status: int, code: ErrorCode, message: str) -> None:
    await _send_json(send, status, error_body(code, message))
