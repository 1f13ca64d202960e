"""An auto-reconnecting APIX client that resumes its session and hands the
application every event of a channel exactly once, in order.

Theory of operation
-------------------
`open_reconnecting_client(url, token_provider)` runs one task, the
*connector*, which loops until the block exits: take a token from the
provider, open a `Client` (`apix_trio.clients.client`, with `authenticate=False`),
authenticate (resuming the session once it has one), serve the connection
until it ends, wait a capped, fully jittered backoff (`apix_trio.delivery.backoff`),
and again. A connection that authenticated resets the backoff, but even the
first retry waits a random moment below `backoff_base`, so the clients of a
node that shut down do not all reconnect in the same instant.

On each connection one loop, the *pump*, takes every frame the server sends
in arrival order. Control frames (auth, subscribe, unsubscribe) are written
with `Client.send_raw` under ids of the wrapper's own range, so their replies
arrive through the same ordered stream as the events; the pump handles each
reply where it stands in that stream. That is what puts a `Resync` right
after the events a `since` replay delivered and before any live event of the
channel, and a `PresenceSnapshot` (the members as of a subscription with
presence, also on every restore) before the `presence` pushes that follow
it: an application that replaces its member list on each snapshot and
applies the pushes stays right across reconnects.

Exactly once per channel: the wrapper remembers, per channel, the id of the
last event it handed to the application (`positions`). An event whose id is
not greater is a duplicate and is dropped. On reconnect it resumes with
`{"session", "positions"}`: the server replays what came after those ids,
before the auth reply, then goes live. When the session is gone (expired, or
the server refuses it) the wrapper gets a fresh one and subscribes again
with `since` = its positions: nothing is lost either way, as long as history
still holds it. When it does not (`recovered: false`), the application gets
`Resync(channel)`: events of that channel between the last one it got before
the disconnect and the ones it got since may be missing; it should reload
that channel's state from its source of truth.

Group subscriptions are at-least-once by design (an event is redelivered
until acked, with its `attempt`): their events are handed over as they come,
never deduplicated.

The wrapper's own control frames (subscribes, unsubscribes, restores) retry
a transient refusal (`unavailable`, `rate_limited`) with the same backoff for
as long as the connection lives, so a backend hiccup during a reconnect
never drops a subscription; only a real refusal (`forbidden`, ...) does.

The application's other calls (`publish`, `history`, `ack`, `call`, ...) wait
for a live connection and make one attempt: one that fails with `ApixClosed`
may or may not have reached the server (retry a publish with the same `key`
to make it exactly-once).

Resource handling: the connector, its connection and the `events()` stream
live exactly as long as the `open_reconnecting_client` block; leaving it
closes the connection with 1000 and ends `events()`.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import attrs
import orjson
import trio

from apix_trio.clients.client import (
    DEFAULT_CLOSE_TIMEOUT,
    ApixClientError,
    ApixClosed,
    ApixError,
    Client,
    EventOps,
    Frame,
    _given,
    _reraise_alone,
    open_client,
)
from apix_trio.clients.statesync import (
    StateSnapshot,
    StateSubscriptionFailed,
    StateSubscriptions,
)
from apix_trio.delivery.backoff import retry_delay
from apix_trio.protocol.codes import CloseCode
from apix_trio.protocol.ids import BadStreamId, StreamId, format_id, parse_id

__all__ = [
    "DEFAULT_BACKOFF_BASE",
    "DEFAULT_BACKOFF_CAP",
    "DEFAULT_BUFFER",
    "Item",
    "PresenceSnapshot",
    "ReconnectStatistics",
    "ReconnectingClient",
    "Resync",
    "StateSnapshot",
    "StateSubscriptionFailed",
    "SubscriptionFailed",
    "TokenProvider",
    "TokenUnavailable",
    "open_reconnecting_client",
]

TokenProvider: TypeAlias = Callable[[], Awaitable[str] | str]

CONTROL_IDS = 1 << 52
"""First id of the wrapper's control frames (the `Client` counts from 1)."""
DEFAULT_BACKOFF_BASE = 0.5
DEFAULT_BACKOFF_CAP = 30.0
DEFAULT_BUFFER = 1024
TRANSIENT_ERRORS = frozenset({"unavailable", "rate_limited"})
"""Refusals that say "not now" (PROTOCOL.md: `unavailable` means retry later):
the wrapper's own subscribes and unsubscribes retry them with backoff while
the connection lives, instead of dropping the subscription."""


class TokenUnavailable(ApixClientError):
    """The token provider raised (the wrapper retries with backoff)."""


@attrs.frozen
class Resync:
    """History no longer held every event of `channel` the application missed
    while disconnected: reload the channel's state from its source of truth.
    Comes right after the events replayed on reconnect, before live ones."""

    channel: str


@attrs.frozen
class SubscriptionFailed:
    """The server refused to restore a subscription on reconnect (e.g. the new
    token lacks the permission): it is dropped, not retried. A transient
    refusal (`TRANSIENT_ERRORS`) is retried instead and never reported here."""

    channel: str
    group: str | None
    code: str
    message: str


@attrs.frozen
class PresenceSnapshot:
    """Who is on `channel` as of a subscription with presence (the first one,
    and every restore on reconnect): replace the member list with `members`;
    the `presence` pushes that follow it in `events()` change this list."""

    channel: str
    members: list[Frame]
    total: int


Item: TypeAlias = (
    Frame | Resync | SubscriptionFailed | PresenceSnapshot | StateSnapshot | StateSubscriptionFailed
)
"""What `events()` yields: push frames as the server sent them (`event`,
`presence`, `state`, `token_expiring`, ...) and the wrapper's own notices
(`clients.statesync` for the state ones)."""

_Key: TypeAlias = tuple[str, str | None]


@attrs.frozen
class _Wanted:
    presence: bool = False


@attrs.define(eq=False)
class _Slot:
    """A control frame waiting for its reply in the pump's stream."""

    on_reply: Callable[[Frame], Awaitable[None]] | None = None
    done: trio.Event = attrs.Factory(trio.Event)
    reply: Frame | None = None


@attrs.frozen
class ReconnectStatistics:
    connects: int
    """Connections that authenticated."""
    resumes: int
    """Of those, resumed sessions."""
    lost_sessions: int
    """Reconnects that found the session gone (a fresh one was made)."""
    failures: int
    """Connection attempts that failed (before or after authenticating)."""


class ReconnectingClient(EventOps):
    """See the module docstring; made by `open_reconnecting_client`.

    `session` is the current session id (None before the first connection);
    `positions` the last event id handed to the application per channel.
    `last_error` is what ended the last failed attempt.
    """

    def __init__(
        self,
        url: str,
        token_provider: TokenProvider,
        *,
        backoff_base: float,
        backoff_cap: float,
        rng: random.Random,
        buffer: int,
        client_options: Mapping[str, Any],
    ) -> None:
        self.url = url
        self.session: str | None = None
        self.auth_result: Frame = {}
        self.last_error: BaseException | None = None
        self._token_provider = token_provider
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._rng = rng
        self._options = dict(client_options)
        self._send, self._recv = trio.open_memory_channel[Item](buffer)
        self._ids = itertools.count(CONTROL_IDS)
        self._slots: dict[int, _Slot] = {}
        self._wanted: dict[_Key, _Wanted] = {}
        self._positions: dict[str, StreamId] = {}
        self._state = StateSubscriptions(self._send.send, self._control)
        self._live: Client | None = None
        self._current: Client | None = None
        self._ready = trio.Event()
        self._closed = False
        self._connects = 0
        self._resumes = 0
        self._lost_sessions = 0
        self._failures = 0

    # -- state -------------------------------------------------------------------

    @property
    def positions(self) -> dict[str, str]:
        return {channel: format_id(position) for channel, position in self._positions.items()}

    @property
    def connected(self) -> bool:
        return self._live is not None

    def statistics(self) -> ReconnectStatistics:
        return ReconnectStatistics(
            connects=self._connects,
            resumes=self._resumes,
            lost_sessions=self._lost_sessions,
            failures=self._failures,
        )

    async def wait_connected(self) -> Client:
        """The live, authenticated `Client`, once there is one.

        Raises `ApixClosed` once the wrapper is closed.
        """
        while True:
            if self._closed:
                raise ApixClosed(CloseCode.NORMAL, "the reconnecting client is closed")
            if self._live is not None:
                return self._live
            await self._ready.wait()

    # -- the application's side ------------------------------------------------------

    def events(self) -> trio.MemoryReceiveChannel[Item]:
        """Every push and notice, in order (see `Item`); ends when the block exits."""
        return self._recv

    async def subscribe(
        self,
        channel: str,
        *,
        group: str | None = None,
        presence: bool | None = None,
        since: str | None = None,
    ) -> Frame | None:
        """Keep `channel` subscribed on every connection from now on.

        Connected: subscribes at once and returns the server's result.
        Disconnected, or disconnected before the result came: returns None;
        the subscription is made on the next connection. `since` (plain
        channels) replays from that id first.

        A transient refusal (`unavailable`, `rate_limited`) is retried with
        the wrapper's backoff while the connection lives.

        Error handling: any other refusal raises `ApixError` and forgets the
        subscription.
        """
        key = (channel, group)
        self._wanted[key] = _Wanted(presence=bool(presence))
        if since is not None and group is None:
            self._positions[channel] = parse_id(since)
        client = self._live
        if client is None:
            return None
        try:
            return await self._subscribe_on(client, key)
        except ApixClosed:
            return None
        except ApixError:
            self._forget(key)
            raise

    async def unsubscribe(self, channel: str, *, group: str | None = None) -> None:
        """Stop the subscription (now if connected, else at the next connection)."""
        key = (channel, group)
        self._forget(key)
        client = self._live
        if client is not None:
            with contextlib.suppress(ApixClosed):  # the next connection drops it
                await self._control(client, "unsubscribe", channel=channel, **_given(group=group))

    async def state_subscribe(self, key: str) -> Frame | None:
        """Keep state `key` subscribed on every connection from now on; the
        application gets a `StateSnapshot`, then gapless `state` pushes
        (`clients.statesync`).

        Connected: subscribes at once and returns `{"value", "version"}`.
        Disconnected, or disconnected before the result came: returns None;
        the subscription is made on the next connection. A transient refusal
        is retried with the wrapper's backoff while the connection lives.

        Error handling: any other refusal raises `ApixError` and forgets the key.
        """
        self._state.want(key)
        client = self._live
        if client is None:
            return None
        try:
            return await self._state.subscribe_on(client, key)
        except ApixClosed:
            return None
        except ApixError:
            self._state.forget(key)
            raise

    async def state_unsubscribe(self, key: str) -> None:
        """Stop the state subscription (now if connected, else at the next connection)."""
        self._state.forget(key)
        client = self._live
        if client is not None:
            with contextlib.suppress(ApixClosed):  # the next connection drops it
                await self._control(client, "state.unsubscribe", key=key)

    @property
    def state_versions(self) -> dict[str, int]:
        """The last version of each subscribed state key handed to the application."""
        return self._state.versions()

    async def aclose(self) -> None:
        """Stop reconnecting and close the connection with 1000 (bounded by
        the client's close timeout); `events()` then ends. Idempotent."""
        self._closed = True
        self._ready.set()
        client = self._current
        if client is not None:
            await client.aclose()

    async def call(self, op: str, **fields: Any) -> Frame:
        """`Client.call` on the live connection, waiting for one first."""
        client = await self.wait_connected()
        return await client.call(op, **fields)

    # -- the connector ---------------------------------------------------------------

    async def _run(self) -> None:
        """Connect, serve, back off, forever (until cancelled)."""
        try:
            attempt = 0
            while not self._closed:
                if await self._connect_once():
                    attempt = 0
                if self._closed:
                    return
                attempt += 1
                await trio.sleep(self._backoff(attempt))
        finally:
            self._closed = True
            self._ready.set()
            self._send.close()

    def _backoff(self, attempt: int) -> float:
        """The wrapper's capped, fully jittered wait before retry `attempt` (from 1)."""
        return retry_delay(
            attempt, base=self._backoff_base, factor=2.0, cap=self._backoff_cap, rng=self._rng
        )

    async def _token(self) -> str:
        """A token from the provider; its failures become `TokenUnavailable`."""
        try:
            token = self._token_provider()
            if inspect.isawaitable(token):
                token = await token
        except Exception as exc:
            raise TokenUnavailable(f"the token provider failed: {exc!r}") from exc
        return str(token)

    async def _connect_once(self) -> bool:
        """One connection, from token to close; True when it authenticated.
        What ended it is left in `last_error`."""
        state: _Connection | None = None
        try:
            token = await self._token()
            async with open_client(self.url, token, authenticate=False, **self._options) as client:
                state = _Connection(client)
                self._current = client
                if not self._closed:
                    await self._serve(state, token)
        except ApixClientError as exc:
            self.last_error = exc
        finally:
            self._current = None
        if state is None or not state.authenticated:
            self._failures += 1
            return False
        return True

    async def _serve(self, state: _Connection, token: str) -> None:
        """Authenticate (resume), then pump until the connection ends.

        Error handling: the connection's end raises `ApixClosed`, a refused
        auth `ApixError`.
        """
        client = state.client
        fields: dict[str, Any] = {"token": token}
        if self.session is not None:
            positions = {
                channel: format_id(position)
                for channel, position in self._positions.items()
                if (channel, None) in self._wanted
            }
            fields["resume"] = {"session": self.session, "positions": positions}

        async def on_auth(frame: Frame) -> None:
            await self._on_auth(state, frame)

        failure: ApixClientError | None = None
        async with trio.open_nursery() as nursery:
            state.nursery = nursery
            try:
                await self._control(client, "auth", wait=False, on_reply=on_auth, **fields)
                await self._pump(state)
            except ApixClientError as exc:  # raised here, not through the nursery
                failure = exc
            finally:
                self._disconnected(client)
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    def _disconnected(self, client: Client) -> None:
        if self._live is client:
            self._live = None
            self._ready = trio.Event()
        slots, self._slots = self._slots, {}
        for slot in slots.values():
            slot.done.set()  # reply stays None: the caller raises ApixClosed
        self._state.disconnected()

    # -- the pump --------------------------------------------------------------------

    async def _pump(self, state: _Connection) -> None:
        """Route every frame in arrival order until the connection ends."""
        async for frame in state.client.pushes():
            if "push" not in frame:
                frame_id = frame.get("id")
                slot = self._slots.pop(frame_id, None) if type(frame_id) is int else None
                if slot is not None:
                    slot.reply = frame
                    slot.done.set()
                    if slot.on_reply is not None:
                        await slot.on_reply(frame)
                continue
            kind = frame.get("push")
            if kind == "event" and "group" not in frame:
                await self._hand_event(frame)
                continue
            if kind == "state" and await self._state.on_push(state.client, frame):
                continue
            if kind == "token_expiring":
                state.nursery.start_soon(self._refresh, state.client)
            await self._send.send(frame)

    async def _hand_event(self, frame: Frame) -> None:
        """Hand a channel event over unless the application already has it."""
        channel = frame.get("channel")
        event = frame.get("event")
        try:
            event_id = parse_id(event["id"]) if isinstance(event, dict) else None
        except (BadStreamId, TypeError, KeyError):
            event_id = None
        if not isinstance(channel, str) or event_id is None:
            await self._send.send(frame)  # not ours to judge
            return
        last = self._positions.get(channel)
        if last is not None and event_id <= last:
            return  # the application has it already
        await self._send.send(frame)
        self._positions[channel] = event_id

    async def _on_auth(self, state: _Connection, frame: Frame) -> None:
        if frame.get("ok") is not True:
            raise ApixError.from_error(frame.get("error"))
        result = frame.get("result")
        result = result if isinstance(result, dict) else {}
        resumed = result.get("resumed") is True
        if self.session is not None:
            if resumed:
                self._resumes += 1
            else:
                self._lost_sessions += 1
        self.session = str(result.get("session", ""))
        self.auth_result = result
        restored: list[_Key] = []
        if resumed:
            for entry in result.get("channels", []):
                if isinstance(entry, dict):
                    key = await self._on_restored(entry)
                    if key is not None:
                        restored.append(key)
        missing = [key for key in self._wanted if key not in restored]
        extra = [key for key in restored if key not in self._wanted]
        state.authenticated = True
        self._connects += 1
        self._live = state.client
        self._ready.set()
        if missing or extra:
            state.nursery.start_soon(self._reconcile, state.client, missing, extra)
        await self._state.on_auth(state.client, result, resumed, state.nursery)

    async def _on_restored(self, entry: Frame) -> _Key | None:
        """One `channels` entry of a resumed auth: note, resync or drop it."""
        channel = str(entry.get("channel"))
        group = entry.get("group")
        group = str(group) if group is not None else None
        key = (channel, group)
        error = entry.get("error")
        if error is not None:
            failed = ApixError.from_error(error)
            if failed.code in TRANSIENT_ERRORS:
                return None  # still wanted: `_reconcile` subscribes it again
            self._forget(key)
            await self._send.send(SubscriptionFailed(channel, group, failed.code, failed.message))
            return None
        await self._note_subscribed(key, entry)
        return key

    async def _note_subscribed(self, key: _Key, result: Frame) -> None:
        """After a subscribe (or restore) result, in stream order: the events
        replayed for it came before, live ones come after."""
        channel, group = key
        if group is not None or key not in self._wanted:
            return
        snapshot = result.get("presence")
        if isinstance(snapshot, dict):
            members = snapshot.get("members")
            await self._send.send(
                PresenceSnapshot(
                    channel,
                    members if isinstance(members, list) else [],
                    int(snapshot.get("total", 0)),
                )
            )
        try:
            position = parse_id(str(result.get("position")))
        except BadStreamId:
            position = None
        known = self._positions.get(channel)
        if position is not None and (known is None or position > known):
            self._positions[channel] = position  # "0-0" too: it is where we start
        if result.get("recovered") is False:
            await self._send.send(Resync(channel))

    async def _reconcile(self, client: Client, missing: list[_Key], extra: list[_Key]) -> None:
        """Subscribe what the server does not have, unsubscribe what it should not."""
        try:
            for channel, group in extra:
                with contextlib.suppress(ApixError):  # gone already, or not ours to keep
                    await self._control(
                        client,
                        "unsubscribe",
                        retry_transient=True,
                        channel=channel,
                        **_given(group=group),
                    )
            for key in missing:
                if key not in self._wanted:
                    continue
                try:
                    await self._subscribe_on(client, key)
                except ApixError as exc:
                    self._forget(key)
                    await self._send.send(SubscriptionFailed(key[0], key[1], exc.code, exc.message))
        except ApixClosed:
            return  # the next connection reconciles again

    async def _subscribe_on(self, client: Client, key: _Key) -> Frame:
        channel, group = key
        wanted = self._wanted.get(key, _Wanted())
        fields = _given(group=group, presence=True if wanted.presence else None)
        position = self._positions.get(channel)
        if group is None and position is not None:
            fields["since"] = format_id(position)

        async def on_reply(frame: Frame) -> None:
            if frame.get("ok") is True and isinstance(frame.get("result"), dict):
                await self._note_subscribed(key, frame["result"])

        return await self._control(
            client, "subscribe", on_reply=on_reply, retry_transient=True, channel=channel, **fields
        )

    async def _control(
        self,
        client: Client,
        op: str,
        *,
        wait: bool = True,
        on_reply: Callable[[Frame], Awaitable[None]] | None = None,
        retry_transient: bool = False,
        **fields: Any,
    ) -> Frame:
        """Send a control frame; with `wait`, its result once the pump saw the reply.

        With `retry_transient`, a `TRANSIENT_ERRORS` refusal is sent again
        after the wrapper's backoff (at least the server's `retry_after`),
        for as long as the connection lives.

        Error handling: `ApixError` for an error reply, `ApixClosed` when the
        connection ends first.
        """
        attempt = 0
        while True:
            try:
                return await self._control_once(client, op, wait, on_reply, fields)
            except ApixError as exc:
                if not retry_transient or exc.code not in TRANSIENT_ERRORS:
                    raise
                attempt += 1
                self.last_error = exc
                await trio.sleep(max(self._backoff(attempt), exc.retry_after or 0.0))

    async def _control_once(
        self,
        client: Client,
        op: str,
        wait: bool,
        on_reply: Callable[[Frame], Awaitable[None]] | None,
        fields: Mapping[str, Any],
    ) -> Frame:
        frame_id = next(self._ids)
        slot = _Slot(on_reply)
        self._slots[frame_id] = slot
        try:
            await client.send_raw(orjson.dumps({**fields, "op": op, "id": frame_id}).decode())
        except BaseException:
            self._slots.pop(frame_id, None)
            raise
        if not wait:
            return {}
        await slot.done.wait()
        reply = slot.reply
        if reply is None:
            raise ApixClosed(1006, "connection lost before the reply")
        if reply.get("ok") is True:
            result = reply.get("result")
            return result if isinstance(result, dict) else {}
        raise ApixError.from_error(reply.get("error"))

    async def _refresh(self, client: Client) -> None:
        """`token_expiring`: refresh with a new token (if that fails, the
        server closes with 4003 and the next connection gets a new one)."""
        try:
            await client.refresh(await self._token())
        except ApixClientError as exc:
            self.last_error = exc

    def _forget(self, key: _Key) -> None:
        self._wanted.pop(key, None)
        channel, group = key
        if group is None:
            self._positions.pop(channel, None)


@attrs.define(eq=False)
class _Connection:
    client: Client
    nursery: trio.Nursery = attrs.field(default=None)
    authenticated: bool = False


@asynccontextmanager
async def open_reconnecting_client(
    url: str,
    token_provider: TokenProvider,
    *,
    backoff_base: float = DEFAULT_BACKOFF_BASE,
    backoff_cap: float = DEFAULT_BACKOFF_CAP,
    rng: random.Random | None = None,
    buffer: int = DEFAULT_BUFFER,
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    **client_options: Any,
) -> AsyncIterator[ReconnectingClient]:
    """A `ReconnectingClient` on `url` for the duration of the block.

    `token_provider()` (sync or async) is asked for a token before every
    connection and on `token_expiring`. Backoff between attempts: full
    jitter, `backoff_base * 2 ** (n - 1)` capped at `backoff_cap` seconds.
    `buffer` items wait for the application in `events()`; when it is full
    the wrapper stops reading the connection's pushes (the `Client` buffers
    more, then closes as a slow consumer and the wrapper resumes later: no
    event is lost). `client_options` go to `open_client` (`ssl_context`,
    `connect_timeout`, `push_buffer`, ...; not `header_auth` or `resume`).

    Resource handling: see the module docstring. Error handling: connection
    trouble never escapes (see `last_error`, `statistics()`); an exception
    from the block propagates as itself.
    """
    for reserved in ("header_auth", "resume", "authenticate"):
        if reserved in client_options:
            raise ValueError(f"{reserved} is managed by the reconnecting client")
    wrapper = ReconnectingClient(
        url,
        token_provider,
        backoff_base=backoff_base,
        backoff_cap=backoff_cap,
        rng=rng or random.Random(),
        buffer=buffer,
        client_options={**client_options, "close_timeout": close_timeout},
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wrapper._run)
            try:
                yield wrapper
            finally:
                # A close handshake needs the connection's tasks alive: close
                # first (shielded, bounded), cancel what is left after.
                with trio.move_on_after(close_timeout) as scope:
                    scope.shield = True
                    await wrapper.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        _reraise_alone(group.exceptions[0])
