"""Connection-level ops: `auth` (with session `resume`), `refresh`, `ping`."""

from __future__ import annotations

from typing import Any

from apix_trio.auth.keys import AuthError
from apix_trio.commands.base import Later, OpError
from apix_trio.commands.resume import load_session, resume_session
from apix_trio.gateway import auditing
from apix_trio.gateway.connection import Connection
from apix_trio.protocol import frames as f
from apix_trio.protocol.codes import CloseCode, ErrorCode


async def auth(conn: Connection, command: f.Auth) -> dict[str, Any] | Later:
    # Only reached before authentication: ServerProtocol refuses a second auth.
    try:
        identity = conn.hub.verifier.verify(command.token, now=conn.hub.wall())
    except AuthError as exc:
        conn.hub.metrics.auth_failures.labels(reason=exc.reason).inc()
        conn.log.info("auth_failed", reason=exc.reason)
        auditing.auth_refused(conn, exc)
        raise OpError(
            ErrorCode.UNAUTHENTICATED, str(exc), close=CloseCode.UNAUTHENTICATED
        ) from None
    # Loaded before authenticating: `unavailable` leaves the client free to retry.
    record = await load_session(conn, identity, command.resume)
    if not await conn.hub.slots.acquire(identity.org, conn.id):
        raise OpError(ErrorCode.LIMIT_EXCEEDED, "the organisation is at its connection limit")
    conn.authenticate(identity)
    conn.log.info("auth_ok", exp=identity.exp)
    auditing.auth_ok(conn, resumed=record is not None and command.resume is not None)
    if record is not None and command.resume is not None:
        return await resume_session(conn, record, command.resume)
    return conn.auth_result()


async def refresh(conn: Connection, command: f.Refresh) -> dict[str, Any]:
    try:
        identity = conn.hub.verifier.verify(command.token, now=conn.hub.wall())
    except AuthError as exc:
        conn.hub.metrics.auth_failures.labels(reason=exc.reason).inc()
        auditing.auth_refused(conn, exc, via="refresh")
        raise OpError(ErrorCode.FORBIDDEN, f"refresh rejected: {exc}") from None
    if identity.org != conn.org or identity.sub != conn.sub:
        raise OpError(ErrorCode.FORBIDDEN, "refresh token must have the same org and sub")
    conn.replace_identity(identity)
    conn.log.info("token_refreshed", exp=identity.exp)
    return {"exp": identity.exp}


async def ping(conn: Connection, command: f.Ping) -> dict[str, Any]:
    return {}
