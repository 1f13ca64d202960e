"""The op dispatcher: one command in, exactly one reply out (plus any pushes).

Each handler returns the reply's `result` dict or raises `OpError`; the
dispatcher turns both into frames, and turns broker trouble into
`unavailable` within `broker.operation_timeout`. No handler raises for
anything a client can send.
"""

from __future__ import annotations

import trio

from apix_trio.broker.model import BrokerUnavailable
from apix_trio.commands import channels, events, groups, presence, session, state
from apix_trio.commands.base import Handler, Later, OpError, Then
from apix_trio.gateway.connection import Connection
from apix_trio.protocol import frames as f
from apix_trio.protocol.codec import encode_error, encode_ok
from apix_trio.protocol.codes import ErrorCode

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


HANDLERS: dict[type, Handler] = {
    f.Auth: session.auth,
    f.Refresh: session.refresh,
    f.Subscribe: channels.subscribe,
    f.Unsubscribe: channels.unsubscribe,
    f.Publish: events.publish,
    f.History: events.history,
    f.Ack: groups.ack,
    f.Presence: presence.presence,
    f.StateGet: state.state_get,
    f.StateSet: state.state_set,
    f.StatePatch: state.state_patch,
    f.StateDelete: state.state_delete,
    f.StateSubscribe: state.state_subscribe,
    f.StateUnsubscribe: state.state_unsubscribe,
    f.Ping: session.ping,
}
"""One handler per op (PROTOCOL.md's op table); an op without one answers `bad_request`."""
