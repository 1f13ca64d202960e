"""Session resume: `auth` with `resume` (PROTOCOL.md "Sessions").

`load_session` finds the record (same org by key, same sub by check);
`resume_session` takes it over (`delivery.sessions.SessionKeeper.adopt`) and
returns a `Later` that saves it, restores every subscription through the
`subscribe` handler itself (permissions against the new token, replay first)
and every state subscription (`commands.state.restore_state`: the result's
`state` list of current values), and makes the auth reply. See
`delivery.sessions` for the whole theory.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from apix_trio.auth.identity import Identity
from apix_trio.broker.model import BrokerUnavailable
from apix_trio.broker.sessions import SessionRecord
from apix_trio.commands.base import Later, OpError, Then
from apix_trio.commands.channels import subscribe
from apix_trio.commands.state import restore_state
from apix_trio.gateway.connection import Connection
from apix_trio.protocol import frames as f


async def load_session(
    conn: Connection, identity: Identity, resume: f.Resume | None
) -> SessionRecord | None:
    """The record `resume` asks for, if `identity` may resume it: same org
    (the org is part of the key) and same sub. Called before the connection
    authenticates, so a backend failure (BrokerUnavailable, answered
    `unavailable`) leaves it unauthenticated and the client can retry.

    Logs only ids and a reason, never the record's channels.
    """
    if resume is None:
        return None
    record = await conn.hub.sessions.load(identity.org, resume.session)
    if record is None or record.sub != identity.sub:
        reason = "unknown" if record is None else "other_sub"
        conn.log.info("resume_refused", session=resume.session, reason=reason)
        return None
    return record


async def resume_session(conn: Connection, record: SessionRecord, resume: f.Resume) -> Later:
    """Take `record` over (`SessionKeeper.adopt`); the returned `Later`
    saves it, restores the subscriptions and makes the auth reply (see the
    module docstring), outside the op timeout."""
    conn.hub.sessions.adopt(conn, record, resume.positions)
    conn.log.info("resume", session=record.session, channels=len(record.channels))
    return Later(functools.partial(_restore, conn, record.conn))


async def _restore(conn: Connection, previous_conn: str) -> Then:
    keeper = conn.hub.sessions
    # First write: takes the session over (fences off its previous holder).
    await keeper.save_now(conn, force=True)
    results: list[dict[str, Any]] = []
    go_live: list[Callable[[], Awaitable[None]]] = []
    for channel in keeper.carried(conn):
        since = None if channel.group is not None else channel.position
        if channel.presence and previous_conn and previous_conn != conn.id:
            await _evict(conn, channel.channel, previous_conn)
        command = f.Subscribe(0, channel.channel, since, channel.group, channel.presence)
        entry: dict[str, Any] = {"channel": channel.channel}
        if channel.group is not None:
            entry["group"] = channel.group
        try:
            outcome = await subscribe(conn, command)
        except OpError as exc:
            entry.update(recovered=False, replayed=0, error=_error(exc.code, exc.message))
        except BrokerUnavailable:
            entry.update(
                recovered=False, replayed=0, error=_error("unavailable", "backend unavailable")
            )
        else:
            if isinstance(outcome, Later):
                outcome = await outcome.finish()
            if isinstance(outcome, Then):
                go_live.append(outcome.after)
                outcome = outcome.result
            entry.update(outcome)
        keeper.restored(conn, channel)
        results.append(entry)
    state, state_live = await restore_state(conn)
    go_live.extend(state_live)
    keeper.restore_done(conn)
    await keeper.save_now(conn)
    replayed = sum(int(entry.get("replayed", 0)) for entry in results)
    conn.log.info("resumed", channels=len(results), replayed=replayed)

    async def go_live_all() -> None:
        for after in go_live:
            await after()

    result = {**conn.auth_result(resumed=True), "channels": results, "state": state}
    return Then(result, go_live_all)


async def _evict(conn: Connection, channel: str, previous_conn: str) -> None:
    """The session's previous connection leaves `channel`'s presence (if it
    is still a member), so its successor's join follows its leave. On
    backend trouble it leaves later: when it closes, or with its node."""
    try:
        await conn.hub.presence.evict(conn.org, channel, previous_conn)
    except BrokerUnavailable as exc:
        conn.log.warning("presence_evict_failed", channel=channel, error=str(exc))


def _error(code: object, message: str) -> dict[str, str]:
    return {"code": str(getattr(code, "value", code)), "message": message}
