"""The APIX Python client: one authenticated WebSocket connection (PROTOCOL.md v1).

Theory of operation
-------------------
`open_client` connects with trio-websocket, starts two tasks in the client's
own nursery and authenticates (first-frame `auth`, or the `Authorization`
header followed by the server's `connected` push):

- the *reader* takes every message off the socket and routes it: a reply
  (`id`) wakes the one caller waiting for that id; a push (`push`) goes into
  a bounded memory channel, read by `pushes()` / `next_push()` in arrival
  order. The reader never awaits the application: trio-websocket stops
  answering pings when its messages are not consumed, so a full push channel
  closes the connection with 4009 (the server's own "slow consumer" code)
  instead of blocking.
- the *writer* takes frames from an outbox channel and writes them. Callers
  only ever put whole frames into the outbox, so a caller cancelled at any
  point can never leave half a frame on the wire.

Each call gets a fresh integer id, registered before its frame is queued, so
any number of tasks may have calls in flight at once. A call cancelled after
its frame was queued remembers its id, and its late reply is dropped.

When the connection ends, for whatever reason, the first cause is recorded
(`close_code`, `close_reason`), every waiting call fails with `ApixClosed`,
and the push channel ends after the pushes received before the close.

This class does no reconnecting and no resuming on its own. A reconnecting
wrapper can be layered on top: it opens a new `Client` with
`resume={"session": old.session, "positions": ...}`, learns why the old one
ended from `wait_closed()` / `close_code`, and keeps its positions from the
pushes it forwards.
"""

from __future__ import annotations

import itertools
import ssl
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any, NoReturn, TypeAlias

import orjson
import trio
import trio_websocket

from apix_trio.clients import pong_guard
from apix_trio.protocol.codes import CloseCode

pong_guard.install()  # no pong after our Close (trio-websocket issue #184)

__all__ = [
    "DEFAULT_CLOSE_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_OUTBOX_SIZE",
    "DEFAULT_PUSH_BUFFER",
    "DEFAULT_SUBPROTOCOL",
    "ApixClientError",
    "ApixClosed",
    "ApixConnectError",
    "ApixError",
    "Client",
    "EventOps",
    "Frame",
    "open_client",
]

Frame: TypeAlias = dict[str, Any]

DEFAULT_SUBPROTOCOL = "apix.v1"
DEFAULT_PUSH_BUFFER = 65536
"""Pushes held for the application before the client counts as slow."""
DEFAULT_OUTBOX_SIZE = 1024
"""Frames queued for the writer before callers wait for room."""
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest message accepted from the server (a 1000-event `history` can be big)."""
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_CLOSE_TIMEOUT = 5.0

# RFC 6455 codes the client itself closes with, beside the protocol's own.
_PROTOCOL_ERROR = 1002
_NO_STATUS = 1005


class ApixClientError(Exception):
    """Base of every error the client raises."""


class ApixError(ApixClientError):
    """The server answered a call with `{"ok": false, "error": {...}}`.

    `retry_after` is set for `rate_limited`, `version` for `conflict`;
    `error` is the whole error object as received.
    """

    def __init__(
        self,
        code: str,
        message: str,
        retry_after: float | None = None,
        version: int | None = None,
        *,
        error: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.version = version
        fallback = {"code": code, "message": message}
        self.error: Frame = dict(error) if error is not None else fallback

    @classmethod
    def from_error(cls, error: Any) -> ApixError:
        """Build from a reply's `error` object, tolerating a malformed one."""
        if not isinstance(error, dict):
            return cls("internal", f"malformed error reply: {error!r}")
        return cls(
            str(error.get("code", "internal")),
            str(error.get("message", "")),
            error.get("retry_after"),
            error.get("version"),
            error=error,
        )


class ApixClosed(ApixClientError):
    """The connection is closed: by the server (its close code and reason),
    by the network (1006), or by this client (the code it sent)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"connection closed ({code}): {reason}")
        self.code = code
        self.reason = reason


class ApixConnectError(ApixClientError):
    """The WebSocket could not be opened. `status_code` is the HTTP status of
    a rejected handshake (401 bad token, 403 origin, 404 path, 400
    subprotocol), or None when the server could not be reached in time."""

    def __init__(self, message: str, status_code: int | None = None, body: bytes = b"") -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body


class _PendingCall:
    """The slot one caller waits on until its reply (or the close) arrives."""

    __slots__ = ("done", "failure", "reply")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: Frame | None = None
        self.failure: ApixClosed | None = None

    def resolve(self, reply: Frame) -> None:
        self.reply = reply
        self.done.set()

    def fail(self, failure: ApixClosed) -> None:
        self.failure = failure
        self.done.set()

    def result(self) -> Frame:
        if self.failure is not None:
            raise self.failure
        assert self.reply is not None
        if self.reply.get("ok") is True:
            result = self.reply.get("result")
            return result if isinstance(result, dict) else {}
        raise ApixError.from_error(self.reply.get("error"))


class EventOps:
    """The ops that mean the same on a plain and a reconnecting client: each
    is one `call`, sending only the options given."""

    async def call(self, op: str, **fields: Any) -> Frame:
        raise NotImplementedError

    async def publish(self, channel: str, data: Any, *, key: str | None = None) -> Frame:
        """Publish `data` (any JSON); returns `{"id", "ts", "duplicate"}`."""
        return await self.call("publish", channel=channel, data=data, **_given(key=key))

    async def history(
        self, channel: str, *, since: str | None = None, limit: int | None = None
    ) -> Frame:
        """Returns `{"events": [...], "position"}`, oldest first."""
        return await self.call("history", channel=channel, **_given(since=since, limit=limit))

    async def ack(self, channel: str, group: str, ids: Iterable[str]) -> Frame:
        """Acknowledge group deliveries; returns `{"acked": n}`."""
        return await self.call("ack", channel=channel, group=group, ids=list(ids))

    async def presence(self, channel: str, *, limit: int | None = None) -> Frame:
        """Who is on `channel`: `{"members": [{"sub", "conn", "since", "info"?}...],
        "total", "users"}`, at most `limit` members (server default 1000)."""
        return await self.call("presence", channel=channel, **_given(limit=limit))

    async def state_get(self, key: str) -> Frame:
        """Returns `{"value", "version"}` (`None`, 0 when never set)."""
        return await self.call("state.get", key=key)

    async def state_set(self, key: str, value: Any, *, version: int | None = None) -> Frame:
        """Replace the value; with `version`, only if that is the current one
        (compare-and-set: `ApixError` `conflict` carries the current `version`).
        Returns `{"version"}`."""
        return await self.call("state.set", key=key, value=value, **_given(version=version))

    async def state_patch(self, key: str, patch: Any, *, version: int | None = None) -> Frame:
        """Apply an RFC 7396 merge patch (same `version` rule); returns `{"version"}`."""
        return await self.call("state.patch", key=key, patch=patch, **_given(version=version))

    async def state_delete(self, key: str, *, version: int | None = None) -> Frame:
        """Set the value to null (same `version` rule); returns `{"version"}`."""
        return await self.call("state.delete", key=key, **_given(version=version))


class Client(EventOps):
    """One authenticated APIX connection; made by `open_client`, not directly.

    After `open_client` returns it, `conn`, `session`, `org`, `sub` come from
    the auth result (or the `connected` push), kept whole in `auth_result`.
    Every method may be called from any number of tasks at once.
    """

    def __init__(
        self,
        ws: trio_websocket.WebSocketConnection,
        *,
        push_buffer: int = DEFAULT_PUSH_BUFFER,
        outbox_size: int = DEFAULT_OUTBOX_SIZE,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        self._ws = ws
        self._close_timeout = close_timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, _PendingCall] = {}
        self._abandoned: set[int] = set()
        self._push_send, self._push_recv = trio.open_memory_channel[Frame](push_buffer)
        self._outbox_send, self._outbox_recv = trio.open_memory_channel[str](outbox_size)
        # (code, reason) of whatever ended the connection first; every
        # ApixClosed raised is a fresh exception built from it.
        self._close: tuple[int, str] | None = None
        self._closed_by_app = False
        self._ended = trio.Event()
        self.conn = ""
        self.session = ""
        self.org = ""
        self.sub = ""
        self.auth_result: Frame = {}

    # -- state -------------------------------------------------------------

    @property
    def subprotocol(self) -> str | None:
        """The subprotocol the server selected, or None."""
        return self._ws.subprotocol

    @property
    def close_code(self) -> int | None:
        """Why the connection ended (see `ApixClosed`); None while it is open."""
        return self._close[0] if self._close is not None else None

    @property
    def close_reason(self) -> str | None:
        """The close reason matching `close_code`; None while open."""
        return self._close[1] if self._close is not None else None

    async def wait_closed(self) -> ApixClosed:
        """Wait until the connection has ended; return what ended it."""
        await self._ended.wait()
        return self._closed_error()

    def _closed_error(self) -> ApixClosed:
        code, reason = self._close or (_NO_STATUS, "connection closed")
        return ApixClosed(code, reason)

    def _record_close(self, code: int, reason: str) -> None:
        """Remember why the connection ended; the first cause wins."""
        if self._close is None:
            self._close = (code, reason)

    # -- calls -------------------------------------------------------------

    async def call(self, op: str, **fields: Any) -> Frame:
        """Send `{"op": op, "id": <fresh id>, **fields}` and return the reply's
        `result`.

        Error handling: an error reply raises `ApixError`; a connection that is
        or becomes closed before the reply raises `ApixClosed`; `fields` that
        orjson cannot encode raise `TypeError` before anything is sent.
        Cancelling the call is safe at any point: the frame is either queued
        whole or not at all, and a reply that comes later is dropped.
        """
        call_id = next(self._ids)
        text = orjson.dumps({**fields, "op": op, "id": call_id}).decode()
        if self._close is not None:
            raise self._closed_error()
        pending = _PendingCall()
        self._pending[call_id] = pending
        queued = False
        try:
            try:
                await self._outbox_send.send(text)
            except trio.ClosedResourceError:
                raise self._closed_error() from None
            queued = True
            await pending.done.wait()
        finally:
            if self._pending.pop(call_id, None) is not None and queued:
                self._abandoned.add(call_id)
        return pending.result()

    async def send_raw(self, text: str) -> None:
        """Queue `text` as one text frame, as is (for tests of the server).

        Its reply, if any, matches no call and so arrives through `pushes()`
        (e.g. the `{"id": null, ...}` answer to a malformed frame).
        Raises `ApixClosed` when the connection is closed.
        """
        if self._close is not None:
            raise self._closed_error()
        try:
            await self._outbox_send.send(text)
        except trio.ClosedResourceError:
            raise self._closed_error() from None

    async def ping(self) -> Frame:
        """The `ping` op (not a WebSocket ping): a round trip to the server."""
        return await self.call("ping")

    async def refresh(self, token: str) -> Frame:
        """Replace the connection's token; returns `{"exp": ...}`."""
        return await self.call("refresh", token=token)

    async def subscribe(
        self,
        channel: str,
        *,
        since: str | None = None,
        group: str | None = None,
        presence: bool | None = None,
    ) -> Frame:
        """Subscribe; returns `{"channel", "position", "recovered", "replayed"}`
        (plus `"presence": {"members", "total"}` with `presence=True`, after
        which `presence` pushes arrive with the events). Options left at None
        are not sent."""
        return await self.call(
            "subscribe", channel=channel, **_given(since=since, group=group, presence=presence)
        )

    async def unsubscribe(self, channel: str, *, group: str | None = None) -> Frame:
        return await self.call("unsubscribe", channel=channel, **_given(group=group))


    async def state_subscribe(self, key: str) -> Frame:
        """Returns `{"value", "version"}`; `state` pushes follow (see `pushes()`)."""
        return await self.call("state.subscribe", key=key)

    async def state_unsubscribe(self, key: str) -> Frame:
        return await self.call("state.unsubscribe", key=key)

    # -- pushes ------------------------------------------------------------

    async def next_push(self, kind: str | None = None) -> Frame:
        """The next push in arrival order; with `kind`, the next push whose
        `push` is `kind`, dropping the others before it.

        Frames from the server that answer no call (replies to `send_raw`)
        also come through here, unchanged.
        Error handling: once the pushes received before the close are used
        up, raises `ApixClosed`.
        """
        while True:
            try:
                frame = await self._push_recv.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                raise self._closed_error() from None
            if kind is None or frame.get("push") == kind:
                return frame

    def pushes(self) -> AsyncIterator[Frame]:
        """Iterate over pushes in arrival order (see `next_push`).

        The iteration ends quietly after `aclose()`; when the server or the
        network ended the connection it raises `ApixClosed` once the pushes
        received before the close are delivered.
        """
        return _Pushes(self)

    # -- closing -----------------------------------------------------------

    async def aclose(self, code: int = CloseCode.NORMAL, reason: str | None = None) -> None:
        """Close the connection with `code`, waiting at most the close timeout
        for the server's answer. Idempotent.

        Resource handling: waiting calls fail with `ApixClosed(code, ...)`,
        `pushes()` ends; on return the socket is closed (forcibly if the close
        handshake did not finish in time or this task was cancelled).
        """
        if self._close is None:
            self._record_close(int(code), reason or "closed by the client")
            self._closed_by_app = True
        try:
            await self._close_socket(int(code), reason)
        finally:
            self._end()

    async def _close_socket(self, code: int, reason: str | None) -> None:
        with trio.move_on_after(self._close_timeout):
            await self._ws.aclose(code, reason)

    def _end(self) -> None:
        """Fail the waiting calls and end both channels (synchronous, idempotent)."""
        self._record_close(_NO_STATUS, "connection closed")
        pending, self._pending = self._pending, {}
        for call in pending.values():
            call.fail(self._closed_error())
        self._push_send.close()
        self._outbox_send.close()
        self._ended.set()

    # -- the client's tasks ---------------------------------------------------

    async def _read_frames(self) -> None:
        """The reader task: route every message until the connection ends."""
        try:
            while True:
                try:
                    message = await self._ws.get_message()
                except trio_websocket.ConnectionClosed as exc:
                    if exc.reason is not None:
                        self._record_close(exc.reason.code, exc.reason.reason or "")
                    return
                fault = self._route(message)
                if fault is not None:
                    self._record_close(fault.code, fault.reason)
                    await self._close_socket(fault.code, fault.reason)
                    return
        finally:
            self._end()

    def _route(self, message: str | bytes) -> ApixClosed | None:
        """Deliver one message; return the close it calls for, if any."""
        if isinstance(message, bytes):
            return ApixClosed(CloseCode.UNSUPPORTED_DATA, "binary frame from the server")
        try:
            frame = orjson.loads(message)
        except orjson.JSONDecodeError:
            return ApixClosed(_PROTOCOL_ERROR, "frame from the server is not JSON")
        if not isinstance(frame, dict):
            return ApixClosed(_PROTOCOL_ERROR, "frame from the server is not an object")
        if "push" not in frame:
            call_id = frame.get("id")
            if type(call_id) is int:
                call = self._pending.pop(call_id, None)
                if call is not None:
                    call.resolve(frame)
                    return None
                if call_id in self._abandoned:
                    self._abandoned.discard(call_id)
                    return None
        try:
            self._push_send.send_nowait(frame)
        except trio.WouldBlock:
            return ApixClosed(CloseCode.SLOW_CONSUMER, "client push buffer overflowed")
        return None

    async def _write_frames(self) -> None:
        """The writer task: write queued frames in order until the socket closes."""
        async for text in self._outbox_recv:
            try:
                await self._ws.send_message(text)
            except trio_websocket.ConnectionClosed:
                # The reader sees the same close and ends the client.
                return

    async def _authenticate(
        self, token: str, *, header_auth: bool, resume: Mapping[str, Any] | None
    ) -> None:
        if header_auth:
            first = await self.next_push()
            if first.get("push") != "connected":
                fault = ApixClosed(_PROTOCOL_ERROR, "expected the connected push first")
                await self.aclose(fault.code, fault.reason)
                raise fault
            result = {key: value for key, value in first.items() if key != "push"}
        else:
            fields = {"resume": dict(resume)} if resume is not None else {}
            result = await self.call("auth", token=token, **fields)
        self.auth_result = result
        self.conn = str(result.get("conn", ""))
        self.session = str(result.get("session", ""))
        self.org = str(result.get("org", ""))
        self.sub = str(result.get("sub", ""))


class _Pushes:
    """The iterator behind `Client.pushes()` (a class, not an async generator,
    so that breaking out of the loop needs no cleanup)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def __aiter__(self) -> _Pushes:
        return self

    async def __anext__(self) -> Frame:
        try:
            return await self._client.next_push()
        except ApixClosed:
            if self._client._closed_by_app:
                raise StopAsyncIteration from None
            raise


def _given(**options: Any) -> Frame:
    return {name: value for name, value in options.items() if value is not None}


@asynccontextmanager
async def open_client(
    url: str,
    token: str,
    *,
    subprotocol: str | None = DEFAULT_SUBPROTOCOL,
    header_auth: bool = False,
    resume: Mapping[str, Any] | None = None,
    authenticate: bool = True,
    push_buffer: int = DEFAULT_PUSH_BUFFER,
    outbox_size: int = DEFAULT_OUTBOX_SIZE,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Client]:
    """Connect to `url` (`ws://` or `wss://`), authenticate, yield a `Client`.

    Authentication is a first-frame `auth` with `token` (and `resume`, e.g.
    `{"session": ..., "positions": {channel: last_id}}`), or with
    `header_auth=True` an `Authorization: Bearer` header and the server's
    `connected` push. `subprotocol=None` offers none. `ssl_context` is for
    `wss://` URLs (default: the system's trust store).

    `authenticate=False` yields the client as soon as the WebSocket is open
    and leaves first-frame authentication to the caller: an `auth` frame sent
    with `send_raw` gets its reply through `pushes()`, in order with the
    events pushed before it (a resume's replay), which is how
    `apix_trio.clients.reconnect` resumes. `session`, `org`, `sub` then stay empty.

    Resource handling: the connection and the client's reader and writer
    tasks live exactly as long as the block; leaving it closes with 1000
    (bounded by `close_timeout`, also when the block is cancelled).

    Error handling: a handshake the server rejects or that fails to connect
    within `connect_timeout` raises `ApixConnectError`; a refused `auth`
    raises `ApixError` (usually `unauthenticated`); a close before the auth
    result raises `ApixClosed`. An exception from the block propagates as
    itself, not wrapped in an exception group.
    """
    if header_auth and resume is not None:
        raise ValueError("resume needs first-frame auth (header_auth=False)")
    headers = [(b"Authorization", f"Bearer {token}".encode())] if header_auth else None
    async with _open_websocket(
        url,
        ssl_context=ssl_context,
        subprotocols=[subprotocol] if subprotocol else None,
        extra_headers=headers,
        max_message_bytes=max_message_bytes,
        connect_timeout=connect_timeout,
        close_timeout=close_timeout,
    ) as ws:
        client = Client(
            ws, push_buffer=push_buffer, outbox_size=outbox_size, close_timeout=close_timeout
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._read_frames)
                nursery.start_soon(client._write_frames)
                try:
                    if authenticate:
                        await client._authenticate(token, header_auth=header_auth, resume=resume)
                    yield client
                finally:
                    with trio.CancelScope(shield=True):
                        await client.aclose()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The client's own tasks do not raise, so a group holds the
            # block's exception alone: hand it on as itself.
            if len(group.exceptions) != 1:
                raise
            _reraise_alone(group.exceptions[0])


def _reraise_alone(exc: BaseException) -> NoReturn:
    """Raise `exc` keeping its own `__context__` (not the group it came in)."""
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, context


@asynccontextmanager
async def _open_websocket(
    url: str,
    *,
    ssl_context: ssl.SSLContext | None,
    subprotocols: list[str] | None,
    extra_headers: list[tuple[bytes, bytes]] | None,
    max_message_bytes: int,
    connect_timeout: float,
    close_timeout: float,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """trio-websocket's connection, with its handshake errors translated to
    `ApixConnectError` (only while connecting: the block's own exceptions
    pass untouched)."""
    connected = False
    try:
        async with trio_websocket.open_websocket_url(
            url,
            ssl_context,
            subprotocols=subprotocols,
            extra_headers=extra_headers,
            message_queue_size=16,
            max_message_size=max_message_bytes,
            connect_timeout=connect_timeout,
            disconnect_timeout=close_timeout,
        ) as ws:
            connected = True
            yield ws
    except trio_websocket.ConnectionRejected as exc:
        if connected:
            raise
        raise ApixConnectError(
            f"{url}: handshake rejected with HTTP {exc.status_code}",
            status_code=exc.status_code,
            body=exc.body or b"",
        ) from None
    except trio_websocket.HandshakeError as exc:
        if connected:
            raise
        cause = exc.__cause__ or exc
        raise ApixConnectError(f"{url}: cannot connect: {cause!r}") from exc
