"""Op handlers: one command in, one reply out (plus any pushes).

Each handler returns the reply's `result` dict or raises `OpError`; the
dispatcher turns both into frames, and turns broker trouble into
`unavailable` within `broker.operation_timeout`. No handler raises for
anything a client can send.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from apix_trio.auth import AuthError
from apix_trio.broker.base import BrokerUnavailable
from apix_trio.broker.groups import dead_letter_channel
from apix_trio.groups import NotAMember
from apix_trio.ids import BadStreamId, parse_id
from apix_trio.protocol import frames as f
from apix_trio.protocol.codec import encode_error, encode_event, encode_ok
from apix_trio.protocol.codes import CloseCode, ErrorCode
from apix_trio.protocol.names import is_channel
from apix_trio.sessions import load_session, resume_session
from apix_trio.subscriptions import ChannelSubscription

if TYPE_CHECKING:
    from apix_trio.connection import Connection


class OpError(Exception):
    """A failed reply: `code`, a human `message` and extra `error` fields.

    With `close`, the connection is closed with that code after the reply.
    """

    def __init__(
        self, code: ErrorCode, message: str, *, close: CloseCode | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.close = close
        self.extra = extra


@attrs.frozen
class Then:
    """A result plus work to run right after the reply is queued."""

    result: dict[str, Any]
    after: Callable[[], Awaitable[None]]


@attrs.frozen
class Later:
    """The reply is made by `finish()`, which runs without the op timeout:
    for work paced by the client's reading rather than by the backend (a
    resume's catch-up). Its broker calls keep their own timeouts."""

    finish: Callable[[], Awaitable[dict[str, Any] | Then]]


Handler = Callable[["Connection", Any], Awaitable["dict[str, Any] | Then | Later"]]


UNAVAILABLE_BOUND = 4.5
"""Seconds from a command's arrival to its `unavailable` (PROTOCOL: within 5 s)."""
MIN_SLICE = 0.25
"""Least time a command gets when it starts late for reasons other than a
failing backend (e.g. queued behind a long, client-paced replay)."""


def _deadline(conn: Connection, received_at: float) -> float:
    """When the command must be answered `unavailable` at the latest.

    Counted from arrival, so publishes a client pipelined into a stalled
    backend are each answered within the bound instead of one timeout after
    another. A command that starts past its bound gets no time while the
    connection's backend calls are failing, else MIN_SLICE.
    """
    bound = min(UNAVAILABLE_BOUND, conn.hub.settings.broker.operation_timeout + 0.5)
    deadline = received_at + bound
    now = trio.current_time()
    if deadline <= now and not conn.backend_failed:
        return now + MIN_SLICE
    return deadline


async def run_command(
    conn: Connection, command: f.Command, received_at: float | None = None
) -> None:
    """Run one command and queue exactly one reply for it.

    Error handling: OpError -> its error reply; BrokerUnavailable or the
    deadline (`_deadline`) -> `unavailable`; anything else -> `internal`,
    logged with its traceback (never sent to the client).
    """
    handler = HANDLERS.get(type(command))
    if received_at is None:
        received_at = trio.current_time()
    after = None
    close = None
    try:
        if handler is None:
            raise OpError(ErrorCode.BAD_REQUEST, f"op {command_name(command)} is not supported")
        with trio.fail_at(_deadline(conn, received_at)):
            outcome = await handler(conn, command)
        conn.backend_failed = False
        if isinstance(outcome, Later):
            outcome = await outcome.finish()
        if isinstance(outcome, Then):
            reply = encode_ok(command.id, outcome.result)
            after = outcome.after
        else:
            reply = encode_ok(command.id, outcome)
    except OpError as exc:
        reply = encode_error(command.id, exc.code, exc.message, **exc.extra)
        close = exc.close
        if exc.code is ErrorCode.BAD_REQUEST:
            conn.hub.metrics.bad_frames.inc()
            close = conn.protocol.note_bad_request()
    except (BrokerUnavailable, trio.TooSlowError):
        conn.backend_failed = True
        conn.hub.metrics.broker_unavailable.inc()
        reply = encode_error(command.id, ErrorCode.UNAVAILABLE, "backend unavailable, retry later")
    except Exception:
        conn.log.exception("op_failed", op=command_name(command))
        reply = encode_error(command.id, ErrorCode.INTERNAL, "internal error")
    conn.send_text(reply)
    if close is not None:
        conn.request_close(close)
    elif after is not None:
        await after()


def command_name(command: f.Command) -> str:
    return type(command).__name__.lower()


def _require_channel_access(conn: Connection, channel: str, action: str) -> None:
    assert conn.permissions is not None
    allowed = (
        conn.permissions.can_subscribe(channel)
        if action == "sub"
        else conn.permissions.can_publish(channel)
    )
    if not allowed:
        conn.log.info("forbidden", channel=channel, action=action)
        raise OpError(ErrorCode.FORBIDDEN, f"no permission to {action} on {channel}")


def _check_since(since: str | None) -> None:
    if since is not None:
        try:
            parse_id(since)
        except BadStreamId as exc:
            raise OpError(ErrorCode.BAD_REQUEST, str(exc)) from None


async def _auth(conn: Connection, command: f.Auth) -> dict[str, Any] | Later:
    # Only reached before authentication: ServerProtocol refuses a second auth.
    try:
        identity = conn.hub.verifier.verify(command.token, now=conn.hub.wall())
    except AuthError as exc:
        conn.hub.metrics.auth_failures.labels(reason=exc.reason).inc()
        conn.log.info("auth_failed", reason=exc.reason)
        raise OpError(
            ErrorCode.UNAUTHENTICATED, str(exc), close=CloseCode.UNAUTHENTICATED
        ) from None
    # Loaded before authenticating: `unavailable` leaves the client free to retry.
    record = await load_session(conn, identity, command.resume)
    if not await conn.hub.slots.acquire(identity.org, conn.id):
        raise OpError(ErrorCode.LIMIT_EXCEEDED, "the organisation is at its connection limit")
    conn.authenticate(identity)
    conn.log.info("auth_ok", exp=identity.exp)
    if record is not None and command.resume is not None:
        return await resume_session(conn, record, command.resume)
    return conn.auth_result()


async def _refresh(conn: Connection, command: f.Refresh) -> dict[str, Any]:
    try:
        identity = conn.hub.verifier.verify(command.token, now=conn.hub.wall())
    except AuthError as exc:
        conn.hub.metrics.auth_failures.labels(reason=exc.reason).inc()
        raise OpError(ErrorCode.FORBIDDEN, f"refresh rejected: {exc}") from None
    if identity.org != conn.org or identity.sub != conn.sub:
        raise OpError(ErrorCode.FORBIDDEN, "refresh token must have the same org and sub")
    conn.replace_identity(identity)
    conn.log.info("token_refreshed", exp=identity.exp)
    return {"exp": identity.exp}


async def _subscribe(conn: Connection, command: f.Subscribe) -> dict[str, Any] | Then | Later:
    if command.group is not None:
        return await _subscribe_group(conn, command, command.group)
    if command.presence:
        raise OpError(ErrorCode.BAD_REQUEST, "presence is not supported yet")
    channel = command.channel
    _require_channel_access(conn, channel, "sub")
    _check_since(command.since)
    existing = conn.subscriptions.get(channel)
    if existing is not None:
        return {"channel": channel, "position": existing.position, "recovered": True, "replayed": 0}
    if len(conn.subscriptions) >= conn.hub.settings.limits.max_subscriptions:
        raise OpError(ErrorCode.LIMIT_EXCEEDED, "too many subscriptions on this connection")
    subscription = ChannelSubscription(conn, channel)
    conn.subscriptions[channel] = subscription
    conn.hub.router.add(conn.org, channel, subscription)
    conn.hub.metrics.subscriptions.inc()

    async def replay_then_reply() -> Then:
        try:
            outcome = await subscription.start(command.since)
        except BaseException:
            _drop_subscription(conn, channel)
            raise
        conn.log.info("subscribe", channel=channel, since=command.since, replayed=outcome.replayed)
        await conn.hub.sessions.save_now(conn)
        result = {
            "channel": channel,
            "position": outcome.position,
            "recovered": outcome.recovered,
            "replayed": outcome.replayed,
        }
        return Then(result, subscription.go_live)

    if command.since is None:
        return await replay_then_reply()
    # A replay is paced by the client's reading, not by the backend: it runs
    # outside the op timeout (each broker read keeps its own).
    return Later(replay_then_reply)


def _drop_subscription(conn: Connection, channel: str) -> bool:
    subscription = conn.subscriptions.pop(channel, None)
    if subscription is None:
        return False
    conn.hub.router.remove(conn.org, channel, subscription)
    conn.hub.metrics.subscriptions.dec()
    return True


async def _subscribe_group(conn: Connection, command: f.Subscribe, group: str) -> dict[str, Any]:
    """Join `group` on the channel (docs/groups.md); a member already gets a no-op."""
    channel = command.channel
    _require_channel_access(conn, channel, "sub")
    if command.since is not None:
        raise OpError(ErrorCode.BAD_REQUEST, "since cannot be combined with group")
    if command.presence:
        raise OpError(ErrorCode.BAD_REQUEST, "presence cannot be combined with group")
    hub = conn.hub
    if hub.namespaces.retention(channel).history_size < 1:
        raise OpError(ErrorCode.BAD_REQUEST, f"{channel} keeps no history, which groups need")
    if not is_channel(dead_letter_channel(channel)):
        raise OpError(
            ErrorCode.BAD_REQUEST, f"{channel} is too long for a group: {channel}.dlq is no channel"
        )
    if not hub.groups.is_member(conn, channel, group):
        limit = hub.settings.limits.max_subscriptions
        if len(conn.subscriptions) + hub.groups.count(conn) >= limit:
            raise OpError(ErrorCode.LIMIT_EXCEEDED, "too many subscriptions on this connection")
        await hub.groups.join(conn, channel, group)
        await hub.sessions.save_now(conn)
    position = await hub.broker.position(conn.org, channel)
    return {"channel": channel, "position": position, "recovered": True, "replayed": 0}


async def _unsubscribe(conn: Connection, command: f.Unsubscribe) -> dict[str, Any]:
    if command.group is not None:
        if conn.hub.groups.leave(conn, command.channel, command.group):
            await conn.hub.sessions.save_now(conn)
        return {}
    if _drop_subscription(conn, command.channel):
        conn.log.info("unsubscribe", channel=command.channel)
        await conn.hub.sessions.save_now(conn)
    return {}


async def _publish(conn: Connection, command: f.Publish) -> dict[str, Any]:
    channel = command.channel
    _require_channel_access(conn, channel, "pub")
    hub = conn.hub
    if not hub.namespaces.options(channel).client_publish:
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
    return {"id": event.id, "ts": event.ts, "duplicate": published.duplicate}


async def _history(conn: Connection, command: f.History) -> dict[str, Any]:
    channel = command.channel
    _require_channel_access(conn, channel, "sub")
    _check_since(command.since)
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


async def _ack(conn: Connection, command: f.Ack) -> dict[str, Any]:
    """Group-wide ack by a member of the group; counts what was pending."""
    _require_channel_access(conn, command.channel, "sub")
    try:
        acked = await conn.hub.groups.ack(conn, command.channel, command.group, command.ids)
    except NotAMember as exc:
        raise OpError(ErrorCode.NOT_FOUND, str(exc)) from None
    return {"acked": acked}


async def _ping(conn: Connection, command: f.Ping) -> dict[str, Any]:
    return {}


HANDLERS: dict[type, Handler] = {
    f.Auth: _auth,
    f.Refresh: _refresh,
    f.Subscribe: _subscribe,
    f.Unsubscribe: _unsubscribe,
    f.Publish: _publish,
    f.History: _history,
    f.Ack: _ack,
    f.Ping: _ping,
}

__all__ = ["HANDLERS", "Later", "OpError", "Then", "run_command"]
