"""State ops: `state.get`, `state.set`, `state.patch`, `state.delete`,
`state.subscribe`, `state.unsubscribe` (PROTOCOL.md "State synchronization"),
and the state half of a resume (`restore_state`).

The values, versions and limits are the broker's (`broker.state`); the
subscribe seam is `routing.state`. Every op needs `perms.state` (or
`admin`) on the key; set, patch and delete are rate limited like every op
after auth (`gateway.connection` takes a token per frame). State
subscriptions count against `limits.max_subscriptions` together with the
connection's channel subscriptions.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from apix_trio.broker.model import BrokerUnavailable
from apix_trio.broker.state import (
    StateConflict,
    StateLimitExceeded,
    StateLimits,
    StateStore,
    StateTooLarge,
    StateValue,
)
from apix_trio.commands.base import OpError, Then, require_subscription_room
from apix_trio.gateway.connection import Connection
from apix_trio.protocol import frames as f
from apix_trio.protocol.codes import ErrorCode
from apix_trio.routing.state import StateWatch, state_result

GoLive = Callable[[], Awaitable[None]]


def require_state_access(conn: Connection, key: str) -> None:
    """`forbidden` unless the token's `perms.state` (or `admin`) allows `key`."""
    assert conn.permissions is not None
    if not conn.permissions.can_state(key):
        conn.log.info("forbidden", key=key, action="state")
        raise OpError(ErrorCode.FORBIDDEN, f"no permission to use state {key}")


def _store(conn: Connection) -> StateStore:
    return conn.hub.broker.state


def _limits(conn: Connection) -> StateLimits:
    return StateLimits.from_settings(conn.hub.settings.state)


async def state_get(conn: Connection, command: f.StateGet) -> dict[str, Any]:
    require_state_access(conn, command.key)
    return state_result(await _store(conn).get(conn.org, command.key))


async def state_set(conn: Connection, command: f.StateSet) -> dict[str, Any]:
    require_state_access(conn, command.key)
    change = _store(conn).set(
        conn.org,
        command.key,
        command.value,
        version=command.version,
        sender=conn.sub,
        limits=_limits(conn),
    )
    return await _changed(conn, change)


async def state_patch(conn: Connection, command: f.StatePatch) -> dict[str, Any]:
    require_state_access(conn, command.key)
    change = _store(conn).patch(
        conn.org,
        command.key,
        command.patch,
        version=command.version,
        sender=conn.sub,
        limits=_limits(conn),
    )
    return await _changed(conn, change)


async def state_delete(conn: Connection, command: f.StateDelete) -> dict[str, Any]:
    require_state_access(conn, command.key)
    change = _store(conn).delete(conn.org, command.key, version=command.version, sender=conn.sub)
    return await _changed(conn, change)


async def _changed(conn: Connection, change: Awaitable[int]) -> dict[str, Any]:
    """`{"version"}` of a change, or its refusal as the protocol's error."""
    try:
        version = await change
    except StateConflict as exc:
        raise OpError(ErrorCode.CONFLICT, f"version conflict: {exc}", version=exc.version) from None
    except StateTooLarge as exc:
        raise OpError(ErrorCode.TOO_LARGE, str(exc)) from None
    except StateLimitExceeded as exc:
        raise OpError(ErrorCode.LIMIT_EXCEEDED, str(exc)) from None
    conn.hub.metrics.state_changes.inc()
    return {"version": version}


async def state_subscribe(conn: Connection, command: f.StateSubscribe) -> dict[str, Any] | Then:
    """Reply `{"value", "version"}`, then push every later change (the seam
    of `routing.state`). Subscribing twice answers the current value and
    keeps the one subscription."""
    key = command.key
    require_state_access(conn, key)
    if key in conn.state_watches:
        return state_result(await _store(conn).get(conn.org, key))
    require_subscription_room(conn)
    current, go_live = await watch_key(conn, key)
    await conn.hub.sessions.save_now(conn)
    return Then(state_result(current), go_live)


async def watch_key(conn: Connection, key: str) -> tuple[StateValue, GoLive]:
    """Register a parked watch on `key`, then read its value: the value for
    the reply and the `after` that makes the watch live once it is sent.

    Error handling: BrokerUnavailable (the watch is dropped again) passes
    through.
    """
    watch = StateWatch(conn, key)
    conn.state_watches[key] = watch
    conn.hub.router.add(conn.org, watch.pseudo_channel, watch)
    conn.hub.metrics.state_subscribers.inc()
    store = _store(conn)
    try:
        current = await store.get(conn.org, key)
    except BaseException:
        drop_state_watch(conn, key)
        raise
    conn.log.info("state_subscribe", key=key, version=current.version)
    reread = functools.partial(store.get, conn.org, key)
    return current, functools.partial(watch.go_live, current.version, reread)


def drop_state_watch(conn: Connection, key: str) -> bool:
    """Forget the connection's watch on `key`; False when there was none."""
    watch = conn.state_watches.pop(key, None)
    if watch is None:
        return False
    conn.hub.router.remove(conn.org, watch.pseudo_channel, watch)
    conn.hub.metrics.state_subscribers.dec()
    return True


async def state_unsubscribe(conn: Connection, command: f.StateUnsubscribe) -> dict[str, Any]:
    require_state_access(conn, command.key)
    if drop_state_watch(conn, command.key):
        conn.log.info("state_unsubscribe", key=command.key)
        await conn.hub.sessions.save_now(conn)
    return {}


async def restore_state(conn: Connection) -> tuple[list[dict[str, Any]], list[GoLive]]:
    """A resume's state keys: watch each again (permission checked against
    the new token) and read its current value. Returns the result's `state`
    entries `{"key", "version", "value"}` and the `after`s that make the
    watches live once the reply is sent.

    A key that cannot be restored (no permission any more, too many
    subscriptions, the backend unavailable) is left out of the entries and
    out of the session, and logged; the client sees it missing and
    subscribes again to learn why.
    """
    keeper = conn.hub.sessions
    entries: list[dict[str, Any]] = []
    go_live: list[GoLive] = []
    for key in keeper.carried_state(conn):
        try:
            require_state_access(conn, key)
            if key in conn.state_watches:
                continue
            require_subscription_room(conn)
            current, after = await watch_key(conn, key)
        except (OpError, BrokerUnavailable) as exc:
            conn.log.info("state_restore_failed", key=key, error=str(exc))
        else:
            result = state_result(current)
            entries.append({"key": key, "version": result["version"], "value": result["value"]})
            go_live.append(after)
        finally:
            keeper.restored_state(conn, key)
    return entries, go_live
