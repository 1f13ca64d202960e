"""The browser pages and their assets, and the development token endpoint.

Pure functions for whichever HTTP app serves them (today a block in
`apix_trio/http/api.py`; the ASGI rewrite mounts the same functions):

- `find_page(path)`: the `StaticPage` (file, content type, headers) served
  at a request path, or None. Only the paths in `ROUTES` are served, so no
  request path can reach another file.
- `parse_dev_token_request(body)` and `mint_dev_token(...)`: `POST
  /dev/token`, which exists ONLY while the server runs on the development
  key pair (`KeyStore.dev_mode`: no `auth.public_keys` configured); any
  other server answers 404. It signs a short-lived token for a demo user of
  org `demo`, allowed the demo's channel and state keys (or, with role
  `admin`, the operator dashboard's admin routes).

Pages: `/demo` (chat with presence, a shared to-do list and counter on
state with compare-and-set), `/dashboard` (the operator dashboard:
connections, rates, latency, closes, consumer groups, from `/metrics` and
the admin API). The client library is at `/client/apix.js` and
`/client/apix.d.ts`; page assets under `/web/`. Everything is package data
(`apix_trio/web/static/`): nothing is fetched from another host, and the
HTML pages carry a Content-Security-Policy that says so.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import orjson

from apix_trio.auth.devkeys import DEV_PRIVATE_NAME, mint_token
from apix_trio.settings import AuthSettings, ServerSettings
from apix_trio.web import STATIC_DIR

DEV_TOKEN_PATH = "/dev/token"
DEV_TOKEN_TTL = 900
"""Seconds a development token is valid (the pages fetch a new one on `token_expiring`)."""
DEMO_ORG = "demo"
DEMO_CHANNEL = "chat.demo"
DEMO_STATE_PATTERN = "demo.>"
"""The demo's state keys: `demo.todos` (the to-do list) and `demo.counter`."""
MAX_NAME_LENGTH = 64
_SUB_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

HTML = "text/html; charset=utf-8"
JAVASCRIPT = "text/javascript; charset=utf-8"
CSS = "text/css; charset=utf-8"
TEXT = "text/plain; charset=utf-8"

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""For the HTML pages: scripts, styles and requests only from this server
(WebSocket to any host, since the WebSocket port differs from the page's)."""

ROUTES: Mapping[str, tuple[str, str]] = {
    "/client/apix.js": ("apix.js", JAVASCRIPT),
    "/client/apix.d.ts": ("apix.d.ts", TEXT),
    "/demo": ("demo.html", HTML),
    "/dashboard": ("dashboard.html", HTML),
    "/web/common.css": ("common.css", CSS),
    "/web/demo.js": ("demo.js", JAVASCRIPT),
    "/web/devtoken.js": ("devtoken.js", JAVASCRIPT),
    "/web/dashboard.js": ("dashboard.js", JAVASCRIPT),
    "/web/promtext.js": ("promtext.js", JAVASCRIPT),
    "/web/vendor/uPlot.iife.min.js": ("vendor/uPlot.iife.min.js", JAVASCRIPT),
    "/web/vendor/uPlot.min.css": ("vendor/uPlot.min.css", CSS),
    "/web/vendor/uPlot.LICENSE": ("vendor/uPlot.LICENSE", TEXT),
}
"""Request path -> (file under `static/`, content type)."""


@attrs.frozen
class StaticPage:
    """One servable file: `body()` reads it (a few tens of KiB at most)."""

    file: Path
    content_type: str

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Response headers (content length excluded: the server adds it)."""
        headers = [
            (b"content-type", self.content_type.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"cache-control", b"no-cache"),
        ]
        if self.content_type == HTML:
            headers.append((b"content-security-policy", CONTENT_SECURITY_POLICY.encode()))
            headers.append((b"referrer-policy", b"no-referrer"))
        return headers

    def body(self) -> bytes:
        return self.file.read_bytes()


def find_page(path: str) -> StaticPage | None:
    """The page or asset served at request path `path`, or None (answer 404).

    A trailing slash is tolerated on the pages (`/demo/`). Error handling:
    never raises; a route whose file is missing from the installation is None.
    """
    if path in ("/demo/", "/dashboard/"):
        path = path[:-1]
    route = ROUTES.get(path)
    if route is None:
        return None
    name, content_type = route
    file = STATIC_DIR / name
    if not file.is_file():
        return None
    return StaticPage(file, content_type)


# ------------------------------------------------------------ dev tokens


DEV_TOKEN_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
"""Response headers of a minted token (content length excluded)."""


class DevTokenError(ValueError):
    """A `POST /dev/token` body that cannot be used (answer 400 with `str()`)."""


@attrs.frozen
class DevTokenRequest:
    """What a page asks for: all optional (a random `sub`, `name` = `sub`)."""

    sub: str | None = None
    name: str | None = None
    admin: bool = False


def parse_dev_token_request(body: bytes) -> DevTokenRequest:
    """`{"sub"?, "name"?, "role"?: "user" | "admin"}` (an empty body: all defaults).

    Error handling: DevTokenError for malformed JSON or a bad field.
    """
    if not body.strip():
        return DevTokenRequest()
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise DevTokenError("the body is not JSON") from None
    if not isinstance(fields, dict):
        raise DevTokenError("expected a JSON object {sub?, name?, role?}")
    unknown = set(fields) - {"sub", "name", "role"}
    if unknown:
        raise DevTokenError(f"unknown fields {sorted(unknown)}")
    sub = fields.get("sub")
    if sub is not None and (not isinstance(sub, str) or not _SUB_RE.fullmatch(sub)):
        raise DevTokenError("sub must be 1-64 characters of A-Z a-z 0-9 _ . -")
    name = fields.get("name")
    if name is not None and (
        not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_LENGTH
    ):
        raise DevTokenError(f"name must be a non-empty string of at most {MAX_NAME_LENGTH}")
    role = fields.get("role", "user")
    if role not in ("user", "admin"):
        raise DevTokenError('role must be "user" or "admin"')
    return DevTokenRequest(sub=sub, name=name.strip() if name else None, admin=role == "admin")


def dev_private_key(auth: AuthSettings) -> Path:
    """The development private key the server verifies against (dev mode only)."""
    return Path(auth.dev_key_dir) / DEV_PRIVATE_NAME


def websocket_location(server: ServerSettings) -> dict[str, Any]:
    """Where the pages find the WebSocket listener: `{"ws_port", "ws_path"}`
    (the page adds its own host name and ws/wss). `ws_port` is left out
    when it is chosen at start (`server.ws_port = 0`); the pages then take
    it from their `?ws=` query parameter."""
    location: dict[str, Any] = {"ws_path": server.ws_path}
    if server.ws_port:
        location["ws_port"] = server.ws_port
    return location


def mint_dev_token(
    auth: AuthSettings,
    server: ServerSettings,
    request: DevTokenRequest,
    *,
    now: float | None = None,
    ttl: float = DEV_TOKEN_TTL,
) -> dict[str, Any]:
    """Sign a development token for `request`; returns the response body
    `{"token", "org", "sub", "name", "roles", "exp", "ws_path", "ws_port"?}`.

    The token: org `demo`, the given or a random `sub` (`user-<hex>`),
    `info: {"name"}` (shown in presence), pub/sub on `chat.demo`, state on
    `demo.>`; with role admin also `roles: ["admin"]`; `iss`/`aud` when
    configured; valid `ttl` seconds. Only call this in dev mode.

    Error handling: OSError/ValueError when the development key cannot be
    read (the caller answers 500 without details).
    """
    issued = time.time() if now is None else now
    sub = request.sub or f"user-{secrets.token_hex(4)}"
    name = request.name or sub
    roles = ["admin"] if request.admin else []
    token = mint_token(
        dev_private_key(auth),
        org=DEMO_ORG,
        sub=sub,
        ttl=ttl,
        pub=[DEMO_CHANNEL],
        sub_patterns=[DEMO_CHANNEL],
        state=[DEMO_STATE_PATTERN],
        roles=roles,
        issuer=auth.issuer,
        audience=auth.audience,
        extra_claims={"info": {"name": name}},
        now=issued,
    )
    return {
        "token": token,
        "org": DEMO_ORG,
        "sub": sub,
        "name": name,
        "roles": roles,
        "exp": int(int(issued) + ttl),
        **websocket_location(server),
    }
