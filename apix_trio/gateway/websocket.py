"""The server side of one WebSocket over a trio stream, on wsproto.

Theory of operation
-------------------
The upgrade request is read and answered here with `gateway/upgrade.py` (no
h11); after the upgrade only wsproto's frame layer (`wsproto.connection.
Connection`) is kept, to parse incoming frames, made when the first bytes
after the upgrade arrive: a connection that has received nothing (a new
one, or one that is cut before its first frame) has no parser, which costs
~1 KB and a few microseconds of set-up. Until then pings and our close
frame are built by one shared, stateless frame builder (`_CONTROL`); a
parser made after our close frame went out is told so, so it expects the
peer's answer (`_frame_connection`).
Data frames going out are built once per message by `apix_trio.protocol.wire`
and written as raw bytes, so an event's frame bytes are shared by every
subscriber.

Two ways to write:

- `try_send_nowait`: one non-blocking `send` on the socket, no task switch,
  for the connection's coalesced writes; it writes nothing while an awaited
  write holds the socket, after our close frame, or on a stream that is not
  a plain socket (TLS, tests' memory streams).
- awaited writes (`send_raw_frames`, the handshake answer, the close frame)
  go through one lock (made at the first write that has to wait for the
  socket: most connections never need it) and run shielded under their own
  deadline
  (`send_timeout`): a write is never cut in half by cancellation (which
  would corrupt the framing), and a peer that stops reading cannot hold a
  write forever. A write that misses its deadline marks the socket broken
  and raises `trio.BrokenResourceError`; so does every later write,
  including one that was already waiting for the lock. `set_deadline` caps
  the deadline of the write in flight and of every later one (graceful
  shutdown: nothing may outlive the grace period, not even a shielded write
  to a peer that stopped reading).

`next_message` is the only reader. On a plain socket it reads the
descriptor itself (a non-blocking `recv`, else `wait_readable`), with the
same checkpoints as trio's `receive_some`: an idle connection then waits
four coroutine frames deep instead of eight, about 1 KB less for every idle
connection and a few microseconds less per read. It hands pongs to send to `send_control`
(the connection queues them in order with its data frames), reports pongs
through `on_pong`, reassembles fragmented text messages up to
`max_message_bytes`, and turns protocol violations into `ProtocolClose`
carrying the close code the caller must send.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator

import trio
from wsproto import ConnectionType
from wsproto.connection import Connection as FrameConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.frame_protocol import FrameProtocol

from apix_trio.gateway.upgrade import (
    BadUpgrade,
    UpgradeRequest,
    accept_response,
    error_response,
    head_end,
    parse_upgrade,
)
from apix_trio.protocol.codes import CloseCode

RECEIVE_SIZE = 65536


class ProtocolClose(Exception):
    """The peer broke a rule; close the connection with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class PeerClosed(Exception):
    """The peer closed (close frame answered) or the stream ended.

    `answered`: our close frame was handed to `send_control` (queued behind
    earlier frames), not written; the caller must flush the queue.
    """

    def __init__(self, code: int | None, reason: str = "", *, answered: bool = False) -> None:
        super().__init__(f"peer closed ({code})")
        self.code = code
        self.reason = reason
        self.answered = answered


class HandshakeFailed(Exception):
    """The bytes before the upgrade were not a usable WebSocket handshake."""


def _no_pong(payload: bytes) -> None:
    return None


class _PendingEvents(list[Event]):
    """What wsproto's frame connection keeps in a deque of its own: events it
    made up itself, which only `receive_data(None)` (never called here)
    produces. A list with `popleft` holds the same promise in 56 bytes
    instead of an empty deque's 760, on every idle connection."""

    __slots__ = ()

    def popleft(self) -> Event:
        return self.pop(0)


def _frame_connection(*, close_sent: bool = False) -> FrameConnection:
    """wsproto's frame layer for a server socket, with `_PendingEvents`.

    `close_sent`: our close frame was already written (by `_CONTROL`): the
    parser is moved to the state that sending it would have left (its bytes
    are dropped), so the peer's close frame completes the closing handshake
    instead of starting one."""
    connection = FrameConnection(ConnectionType.SERVER)
    if isinstance(getattr(connection, "_events", None), deque):  # the wsproto we know
        connection._events = _PendingEvents()  # type: ignore[assignment]
    if close_sent:
        connection.send(CloseConnection(code=CloseCode.NORMAL))
    return connection


# Builds server control frames (unmasked, no extensions): `ping` and `close`
# keep no state between calls, so one instance serves every connection that
# has no parser of its own yet.
_CONTROL = FrameProtocol(client=False, extensions=[])


class ServerWebSocket:
    """One server-side WebSocket. See the module docstring."""

    __slots__ = (
        "_broken",
        "_closed",
        "_deadline",
        "_events",
        "_fd",
        "_head",
        "_parts",
        "_send_lock",
        "_size",
        "_trailing",
        "_write_scope",
        "_writers",
        "_ws",
        "accepted",
        "close_sent",
        "max_message_bytes",
        "on_pong",
        "send_control",
        "send_timeout",
        "stream",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        max_message_bytes: int,
        send_timeout: float = 10.0,
    ) -> None:
        self.stream = stream
        self.max_message_bytes = max_message_bytes
        self.send_timeout = send_timeout
        self.on_pong: Callable[[bytes], None] = _no_pong
        # Where pongs go; None: written at once (awaited).
        self.send_control: Callable[[bytes], None] | None = None
        self._ws: FrameConnection | None = None
        self._trailing = b""
        self._head = b""  # the 101 answer, when it waits for the first frame
        self._send_lock: trio.StrictFIFOLock | None = None  # made when first needed
        # Awaited writes holding or waiting for the lock: while non-zero,
        # nothing may be written around them (`try_send_nowait` writes 0).
        self._writers = 0
        self._events: Iterator[Event] = iter(())
        self._parts: list[str] = []
        self._size = 0
        self._broken = False
        self._closed = False
        self._deadline = math.inf
        self._write_scope: trio.CancelScope | None = None
        self.close_sent = False
        self.accepted = False
        # The socket's descriptor for `try_send_nowait`: only a plain TCP
        # socket stream (not TLS, not trio's in-memory streams in tests).
        self._fd: int | None = (
            stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None
        )

    # -- handshake -----------------------------------------------------------

    async def read_request(self) -> UpgradeRequest:
        """Read until the upgrade request arrives (caller bounds the time).

        Raises HandshakeFailed when the bytes are not a WebSocket upgrade (a
        400 has already been answered) or the peer hung up.
        """
        buffer = b""
        # The first read comes right after the task started (a scheduling
        # point already): when the request is there, it is taken without
        # another trip through the scheduler (`_receive`'s).
        first = True
        while True:
            try:
                data = await self._receive(first=first)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise HandshakeFailed("connection lost during handshake") from exc
            first = False
            if not data:
                raise HandshakeFailed("connection closed during handshake")
            buffer += data
            try:
                end = head_end(buffer)
                if end < 0:
                    continue
                request = parse_upgrade(buffer[:end])
            except BadUpgrade as exc:
                await self._send_http_error(exc.status, f"not a WebSocket upgrade: {exc}\n")
                raise HandshakeFailed(str(exc)) from exc
            # Frames a client sent right behind its request, without waiting.
            self._trailing = buffer[end:]
            return request

    async def accept(
        self, request: UpgradeRequest, subprotocol: str | None, *, with_next_write: bool = False
    ) -> None:
        """Answer 101 and switch to WebSocket frames.

        `with_next_write`: the caller writes a frame right after (the
        `connected` push of a header-authenticated connection), so the 101
        is kept and goes out in front of the next write, in the same system
        call, instead of in one of its own. Every later write puts it first.
        """
        response = accept_response(request.key, subprotocol)
        if with_next_write:
            self._head = response
        else:
            await self._send(response)
        self.accepted = True
        if self._trailing:
            ws = self._ws = _frame_connection()
            ws.receive_data(self._trailing)
            self._events = ws.events()
            self._trailing = b""

    async def reject(self, status: int, body: str) -> None:
        """Answer the upgrade with an HTTP error; no WebSocket opens."""
        await self._send(error_response(status, body))

    async def _send_http_error(self, status: int, body: str) -> None:
        try:
            await self._send(error_response(status, body))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    # -- sending -------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        if self._broken:
            raise trio.BrokenResourceError("socket write timed out earlier")
        if self._head:
            data = self._head + data
            self._head = b""
        fd = self._fd
        if fd is not None and not self._writers:
            # Small writes (the 101, a close frame) nearly always fit in the
            # socket buffer: no lock, no cancel scope, no task switch.
            try:
                written = os.write(fd, data)
            except BlockingIOError:
                written = 0
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket write failed: {exc}") from exc
            if written == len(data):
                return
            if written:  # the rest must follow, cancelled or not: shielded
                with trio.CancelScope(shield=True):
                    await self._send_locked(data[written:])
                return
        await self._send_locked(data)

    async def _send_locked(self, data: bytes) -> None:
        if self._send_lock is None:
            self._send_lock = trio.StrictFIFOLock()
        # Counted from before the lock is asked for until the write is done,
        # so `try_send_nowait` never writes between this write and the
        # bytes queued before it, nor while the lock passes to a waiter.
        self._writers += 1
        try:
            async with self._send_lock:
                # The write we queued behind may have timed out meanwhile: do
                # not wait out a second send_timeout on the same dead peer.
                if self._broken:
                    raise trio.BrokenResourceError("socket write timed out earlier")
                deadline = min(trio.current_time() + self.send_timeout, self._deadline)
                with trio.move_on_at(deadline) as scope:
                    scope.shield = True
                    self._write_scope = scope
                    try:
                        await self.stream.send_all(data)
                    finally:
                        self._write_scope = None
                if scope.cancelled_caught:
                    self._broken = True
                    raise trio.BrokenResourceError("peer did not take data in time")
        finally:
            self._writers -= 1

    def set_deadline(self, deadline: float) -> None:
        """No write may run past `deadline` (trio time), the one in flight included.

        A write cut short by it breaks the socket like a send timeout does.
        """
        self._deadline = min(self._deadline, deadline)
        if self._write_scope is not None:
            self._write_scope.deadline = min(self._write_scope.deadline, deadline)

    @property
    def can_send_nowait(self) -> bool:
        """Whether `try_send_nowait` can write at all on this stream."""
        return self._fd is not None

    def try_send_nowait(self, data: bytes) -> int:
        """Write what the socket takes right now, without a task switch.

        Returns the number of bytes written: 0 when the socket buffer is
        full, a write is already in progress (ordering), our close frame was
        sent, or the stream is not a socket. Errors are left for the next
        awaited write to find. The caller must queue whatever was not
        written, ahead of anything else.
        """
        fd = self._fd
        if fd is None or not self.accepted or self._broken or self.close_sent or self._writers:
            return 0
        head = self._head
        if head:  # the 101 answer, kept by `accept` to go out with this write
            try:
                written = os.write(fd, head + data)
            except OSError:
                return 0
            if written < len(head):
                self._head = head[written:]
                return 0
            self._head = b""
            return written - len(head)
        try:
            return os.write(fd, data)
        except OSError:  # BlockingIOError included: the socket is full
            return 0

    async def send_raw_frames(self, data: bytes) -> None:
        """Write ready-made frames (from `apix_trio.protocol.wire`, or control frames)."""
        await self._send(data)

    def ping_frame(self, payload: bytes) -> bytes:
        """The bytes of a ping frame (to queue in order with data frames)."""
        assert self.accepted, "not accepted"
        if self._ws is None:  # nothing received yet: the connection is open
            return bytes(_CONTROL.ping(payload))
        return self._ws.send(Ping(payload=payload))

    async def send_ping(self, payload: bytes) -> None:
        await self._send(self.ping_frame(payload))

    @property
    def broken(self) -> bool:
        """The socket failed (a read error such as a reset, or a write that
        timed out): every write raises `trio.BrokenResourceError`."""
        return self._broken

    async def send_close(self, code: int, reason: str = "") -> None:
        """Send our close frame once; later calls do nothing."""
        ws = self._ws
        if not self.accepted or self.close_sent:
            return
        if ws is None:  # nothing received yet: the connection is open
            self.close_sent = True
            await self._send(bytes(_CONTROL.close(code, reason)))
            return
        if ws.state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            return
        self.close_sent = True
        await self._send(ws.send(CloseConnection(code=code, reason=reason)))

    # -- receiving -----------------------------------------------------------

    async def next_message(self) -> str:
        """The next complete text message.

        Raises ProtocolClose (binary frame 1003, too large 1009, malformed
        frames 1002/1007), PeerClosed (close frame or end of stream).
        """
        assert self.accepted, "not accepted"
        while True:
            ws = self._ws
            if ws is not None:
                for event in self._events:
                    message = await self._handle(ws, event)
                    if message is not None:
                        return message
            try:
                data = await self._receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise PeerClosed(None, "connection lost") from exc
            if not data:
                raise PeerClosed(None, "end of stream")
            if ws is None:
                ws = self._ws = _frame_connection(close_sent=self.close_sent)
            ws.receive_data(bytes(data))
            # Lazily: wsproto updates its state frame by frame, so pings before
            # a close frame in the same read are still answered (RFC 6455 5.5.2).
            self._events = ws.events()

    async def _receive(self, *, first: bool = False) -> bytes | bytearray:
        """At most RECEIVE_SIZE bytes from the peer; b"" at the end of the stream.

        What `receive_some` promises, on the descriptor directly for a plain
        socket: a cancelled caller is told so before anything is read, data
        that was read is never lost to a cancellation, and every call is a
        checkpoint (a peer that floods cannot starve other tasks). Raises
        `trio.BrokenResourceError` on a socket error, `trio.ClosedResourceError`
        once the socket was closed here.

        `first`: the connection task's first read. Its task has just been
        scheduled, so data that is there already is returned without the
        trailing checkpoint (still not if cancelled); nothing else may read
        this way.
        """
        fd = self._fd
        if fd is None:
            return await self.stream.receive_some(RECEIVE_SIZE)
        # trio's own sandwich (`_nonblocking_helper`): try at once, and only
        # when the socket has nothing wait for it.
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            data = os.read(fd, RECEIVE_SIZE)
        except BlockingIOError:
            pass
        except OSError as exc:
            self._broken = True  # reset or failed: no write can succeed either
            raise trio.BrokenResourceError(f"socket read failed: {exc}") from exc
        else:
            if not first:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        while True:
            await trio.lowlevel.wait_readable(fd)  # ClosedResourceError if closed meanwhile
            try:
                return os.read(fd, RECEIVE_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                self._broken = True
                raise trio.BrokenResourceError(f"socket read failed: {exc}") from exc

    async def _handle(self, ws: FrameConnection, event: Event) -> str | None:
        if isinstance(event, TextMessage):
            self._size += len(event.data.encode()) if not event.data.isascii() else len(event.data)
            if self._size > self.max_message_bytes:
                raise ProtocolClose(CloseCode.MESSAGE_TOO_BIG, "message too large")
            if event.message_finished and not self._parts:
                self._size = 0
                return event.data
            self._parts.append(event.data)
            if not event.message_finished:
                return None
            text = "".join(self._parts)
            self._parts.clear()
            self._size = 0
            return text
        if isinstance(event, BytesMessage):
            raise ProtocolClose(CloseCode.UNSUPPORTED_DATA, "binary frames are not supported")
        if isinstance(event, Ping):
            if ws.state is ConnectionState.OPEN:
                pong = ws.send(event.response())
                if self.send_control is not None:
                    self.send_control(pong)
                else:
                    await self._send(pong)
            return None
        if isinstance(event, Pong):
            self.on_pong(bytes(event.payload))
            return None
        if isinstance(event, CloseConnection):
            if ws.state is ConnectionState.REMOTE_CLOSING:
                response = ws.send(event.response())
                if self.send_control is not None:
                    # Behind the pongs and frames already queued; the caller
                    # flushes them (`answered`) and queues nothing after.
                    self.send_control(response)
                    raise PeerClosed(event.code, event.reason or "", answered=True)
                self.close_sent = True
                try:
                    await self._send(response)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                raise PeerClosed(event.code, event.reason or "")
            if ws.state is ConnectionState.CLOSED:
                raise PeerClosed(event.code, event.reason or "")
            # wsproto reports a framing error as a CloseConnection while OPEN.
            raise ProtocolClose(event.code, event.reason or "protocol error")
        return None

    def unlink(self) -> None:
        """Drop the callbacks into the connection (`on_pong`, `send_control`).

        They make a reference cycle (connection -> websocket -> bound method
        -> connection): left in place, every closed connection's objects
        wait for the cyclic garbage collector, whose collections then cost
        CPU in proportion to the connection rate."""
        self.on_pong = _no_pong
        self.send_control = None

    async def aclose(self) -> None:
        """Close the stream (never raises; a second call does nothing).

        A plain socket is closed at once (what `SocketStream.aclose` does,
        minus its checkpoint: no cancel scope needed); other streams (TLS)
        are closed shielded from cancellation.
        """
        if self._closed:
            return
        self._closed = True
        self._fd = None  # the descriptor number may be reused at once
        stream = self.stream
        if isinstance(stream, trio.SocketStream):
            stream.socket.close()  # wakes any task waiting on it, then closes
            return
        with trio.CancelScope(shield=True):
            try:
                await stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
