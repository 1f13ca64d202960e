"""Audit hooks of the gateway and the op handlers: who, from where, what.

Each function turns one occurrence into one entry of the org's audit trail
(HTTP_API.md, "Audit trail") through the node's `hub.audit` writer, which
never blocks or raises. The call sites (`connection.py`, `handshake.py`,
`commands/session.py`, `commands/base.py`, `commands/events.py`) stay one
line each; what is recorded, and when not, is decided here:

- an entry needs a trustworthy org: the connection's identity, or the claims
  of a token whose signature verified but that was refused later (an expired
  token, a wrong `aud`: `AuthError.org`). Without one (a bad signature, an
  auth timeout before any token, bad frames before auth) the occurrence goes
  to the JSON log only, which the call sites already write;
- `connection.closed` only for closes the server decided, with the codes of
  `AUDITED_CLOSES`; a client closing with such a code is not recorded;
- `rate.limited` only for the first refusal of a streak (`AbuseTracker`).

Connections are seen through the `AuditedConnection` protocol, so this
module does not import `connection.py` (which imports it).
"""

from __future__ import annotations

from typing import Any, Protocol

import trio

from apix_trio.auth.identity import Identity
from apix_trio.auth.keys import AuthError
from apix_trio.gateway.hub import Hub
from apix_trio.gateway.ratelimit import AbuseTracker
from apix_trio.observability.audit import AuditType
from apix_trio.protocol.codes import CloseCode

AUDITED_CLOSES = frozenset(
    {
        CloseCode.POLICY_VIOLATION,
        CloseCode.UNAUTHENTICATED,
        CloseCode.TOKEN_EXPIRED,
        CloseCode.SLOW_CONSUMER,
        CloseCode.RATE_LIMIT_ABUSE,
        CloseCode.ADMIN_DISCONNECT,
    }
)
"""Server closes that are audited (HTTP_API.md: 1008, 4001, 4003, 4009, 4029, 4030)."""


class AuditedConnection(Protocol):
    """What the hooks read of a `gateway.connection.Connection`."""

    hub: Hub
    peer: str
    identity: Identity | None
    claimed: tuple[str, str] | None
    @property
    def abuse(self) -> AbuseTracker: ...

    @property
    def id(self) -> str: ...


def peer_address(stream: trio.abc.Stream) -> str:
    """The peer's IP address of a socket stream (TLS included), else ""."""
    sock: Any = getattr(stream, "socket", None)
    if sock is None:
        sock = getattr(getattr(stream, "transport_stream", None), "socket", None)
    try:
        return str(sock.getpeername()[0]) if sock is not None else ""
    except (OSError, IndexError, TypeError, AttributeError):
        return ""


def _who(conn: AuditedConnection) -> tuple[str, str] | None:
    """(org, sub) the connection's entries belong to, if any is trustworthy."""
    if conn.identity is not None:
        return conn.identity.org, conn.identity.sub
    return conn.claimed


# -- authentication --------------------------------------------------------------


def token_refused(hub: Hub, exc: AuthError, *, conn: str, ip: str, via: str) -> None:
    """`auth.failed` in the token's org when its signature verified; else
    nothing (the caller's JSON log line is the only record)."""
    if exc.org is not None:
        hub.audit.record(
            exc.org,
            AuditType.AUTH_FAILED,
            sub=exc.sub or "",
            conn=conn,
            ip=ip,
            detail={"reason": exc.reason, "via": via},
        )


def auth_refused(conn: AuditedConnection, exc: AuthError, via: str = "auth") -> None:
    """A token sent on the connection was refused (`auth` op, or `refresh`)."""
    if via == "refresh" and conn.identity is not None:
        # An authenticated connection: its own org is trustworthy.
        conn.hub.audit.record(
            conn.identity.org,
            AuditType.AUTH_FAILED,
            sub=conn.identity.sub,
            conn=conn.id,
            ip=conn.peer,
            detail={"reason": exc.reason, "via": via},
        )
        return
    token_refused(conn.hub, exc, conn=conn.id, ip=conn.peer, via=via)
    if exc.org is not None:
        conn.claimed = (exc.org, exc.sub or "")  # for the 4001 close that follows


def authenticated(
    hub: Hub, identity: Identity, *, conn: str, ip: str, via: str, resumed: bool = False
) -> None:
    """`auth.ok`."""
    detail: dict[str, Any] = {"via": via, "exp": identity.exp}
    if resumed:
        detail["resumed"] = True
    hub.audit.record(
        identity.org, AuditType.AUTH_OK, sub=identity.sub, conn=conn, ip=ip, detail=detail
    )


def auth_ok(conn: AuditedConnection, *, resumed: bool = False) -> None:
    """`auth.ok` for the connection's new identity (the `auth` op)."""
    if conn.identity is not None:
        authenticated(
            conn.hub, conn.identity, conn=conn.id, ip=conn.peer, via="auth", resumed=resumed
        )


# -- connection events ------------------------------------------------------------


def server_close(conn: AuditedConnection, code: int, reason: str) -> None:
    """`connection.closed` for a close the server decided (first request wins)."""
    if code not in AUDITED_CLOSES:
        return
    who = _who(conn)
    if who is not None:
        conn.hub.audit.record(
            who[0],
            AuditType.CONNECTION_CLOSED,
            sub=who[1],
            conn=conn.id,
            ip=conn.peer,
            detail={"code": int(code), "reason": reason},
        )


def rate_limited(conn: AuditedConnection, now: float, op: str) -> None:
    """`rate.limited` when this refusal starts a streak (call it before
    `conn.abuse.record`)."""
    if conn.abuse.streak_started(now) is not None:
        return
    who = _who(conn)
    if who is not None:
        conn.hub.audit.record(
            who[0],
            AuditType.RATE_LIMITED,
            sub=who[1],
            conn=conn.id,
            ip=conn.peer,
            detail={"op": op},
        )


def permission_denied(
    conn: AuditedConnection, op: str, *, channel: str | None = None, key: str | None = None
) -> None:
    """`permission.denied` for an op refused `forbidden` (a channel or a state key)."""
    who = _who(conn)
    if who is None:
        return
    detail: dict[str, Any] = {"op": op}
    if channel is not None:
        detail["channel"] = channel
    if key is not None:
        detail["key"] = key
    conn.hub.audit.record(
        who[0], AuditType.PERMISSION_DENIED, sub=who[1], conn=conn.id, ip=conn.peer, detail=detail
    )
