"""Who is calling: bearer-token authentication, the per-org rate limit and
permission checks, as FastAPI dependencies.

`caller` verifies `Authorization: Bearer <JWT>` with the WebSocket gateway's
own verifier (`hub.verifier`), counts the request against the org's bucket
(`api.rate_per_org`) and returns a `Caller`; `admin` also requires the
`admin` role. Every route takes the org from the token only: no path, query
or body field names an org.

Verified tokens are cached (signature checks are the costliest part of a
small request): a cached token is reused only while the key set it was
verified with is still the one in force (a key reload drops the cache) and
its time claims still hold; `exp`, `nbf` and `iat` are checked again on
every use with the configured leeway.
"""

from __future__ import annotations

from typing import Annotated, Any

import attrs
import trio
from fastapi import Depends, Request

from apix_trio.auth.identity import Identity
from apix_trio.auth.keys import AuthError, KeySet
from apix_trio.auth.permissions import ADMIN_ROLE, Permissions
from apix_trio.gateway.hub import Hub
from apix_trio.http.errors import ApiError
from apix_trio.http.ratelimit import OrgRateLimiter, retry_after_header
from apix_trio.observability.logs import get_logger
from apix_trio.protocol.codes import ErrorCode

TOKEN_CACHE_SIZE = 4096
log = get_logger("apix.http")

SECURITY_SCHEME = "bearer"
BEARER = {
    "type": "http",
    "scheme": "bearer",
    "bearerFormat": "JWT",
    "description": "A JWT, as for WebSocket clients",
}
"""The OpenAPI security scheme (`api._finish_openapi` adds it to every route
that depends on `caller`); the header itself is parsed by `caller`, one
dependency instead of two on the hot path."""


@attrs.frozen
class Caller:
    """An authenticated request's identity and permissions."""

    identity: Identity
    permissions: Permissions

    @property
    def org(self) -> str:
        return self.identity.org

    @property
    def sub(self) -> str:
        return self.identity.sub

    @property
    def is_admin(self) -> bool:
        return ADMIN_ROLE in self.identity.roles


@attrs.define(eq=False)
class _Cached:
    keyset: KeySet
    caller: Caller


class ApiState:
    """What the HTTP app keeps beside the hub: the rate limiter and the token cache."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.limiter = OrgRateLimiter(hub.settings.api.rate_per_org)
        self._tokens: dict[str, _Cached] = {}

    def authenticate(self, token: str) -> Caller:
        """The Caller of `token`. Error handling: ApiError 401 for any refusal."""
        hub = self.hub
        now = hub.wall()
        keyset = hub.verifier.keys.current
        cached = self._tokens.get(token)
        if cached is not None and cached.keyset is keyset and _still_valid(cached, hub, now):
            return cached.caller
        try:
            identity = hub.verifier.verify(token, now=now)
        except AuthError as exc:
            self._tokens.pop(token, None)
            log.info("http_auth_failed", reason=exc.reason)
            raise ApiError(ErrorCode.UNAUTHENTICATED, exc.message) from None
        caller = Caller(identity, Permissions.from_identity(identity))
        if len(self._tokens) >= TOKEN_CACHE_SIZE:
            self._tokens.clear()
        self._tokens[token] = _Cached(keyset, caller)
        return caller

    def count_request(self, org: str) -> None:
        """Take one request from `org`'s bucket. Error handling: ApiError 429."""
        wait = self.limiter.try_take(org, trio.current_time())
        if wait > 0:
            self.hub.metrics.rate_limited.inc()
            raise ApiError(
                ErrorCode.RATE_LIMITED,
                f"more than {self.limiter.rate:g} requests per second for this org",
                headers={"Retry-After": retry_after_header(wait)},
                retry_after=round(wait, 3),
            )


def _still_valid(cached: _Cached, hub: Hub, now: float) -> bool:
    leeway = hub.settings.auth.leeway
    claims: Any = cached.caller.identity.claims
    if now >= cached.caller.identity.exp + leeway:
        return False
    for name in ("nbf", "iat"):
        value = claims.get(name)
        if isinstance(value, int | float) and value > now + leeway:
            return False
    return True


def api_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.api
    return state


async def caller(request: Request) -> Caller:
    """The authenticated caller, counted against its org's rate limit."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(ErrorCode.UNAUTHENTICATED, "expected Authorization: Bearer <token>")
    state = api_state(request)
    found = state.authenticate(token)
    log_fields = request.scope.setdefault("state", {})
    log_fields["apix_org"] = found.org
    log_fields["apix_sub"] = found.sub
    state.count_request(found.org)
    return found


async def admin(found: Annotated[Caller, Depends(caller)]) -> Caller:
    """An authenticated caller with the `admin` role."""
    if not found.is_admin:
        raise ApiError(ErrorCode.FORBIDDEN, "the admin role is required")
    return found


AnyCaller = Annotated[Caller, Depends(caller)]
"""A route parameter: the authenticated caller."""
Admin = Annotated[Caller, Depends(admin)]
"""A route parameter: the authenticated caller, an admin."""


def require(found: Caller, allowed: bool, action: str, name: str) -> None:
    """ApiError 403 unless `allowed` (a permission check's answer)."""
    if not allowed:
        log.info("forbidden", org=found.org, sub=found.sub, channel=name, action=action)
        raise ApiError(ErrorCode.FORBIDDEN, f"no permission to {action} on {name}")
