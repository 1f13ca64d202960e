"""The server side of one WebSocket over a trio stream, on wsproto.

Theory of operation
-------------------
wsproto does the handshake and parses incoming frames; data frames going out
are built once per message by `apix_trio.protocol.wire` and written as raw bytes, so
an event's frame bytes are shared by every subscriber.

Every write to the socket (data batches, pongs, pings, close frames) goes
through one lock and runs shielded under its own deadline (`send_timeout`):
a write is never cut in half by cancellation (which would corrupt the
framing), and a peer that stops reading cannot hold a write forever. A write
that misses its deadline marks the socket broken and raises
`trio.BrokenResourceError`; so does every later write, including one that
was already waiting for the lock. `set_deadline` caps the deadline of the
write in flight and of every later one (graceful shutdown: nothing may
outlive the grace period, not even a shielded write to a peer that stopped
reading).

`next_message` is the only reader. It answers pings itself, reports pongs
through `on_pong`, reassembles fragmented text messages up to
`max_message_bytes`, and turns protocol violations into `ProtocolClose`
carrying the close code the caller must send.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

from apix_trio.protocol.codes import CloseCode

RECEIVE_SIZE = 65536


class ProtocolClose(Exception):
    """The peer broke a rule; close the connection with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class PeerClosed(Exception):
    """The peer closed (close frame answered) or the stream ended."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"peer closed ({code})")
        self.code = code
        self.reason = reason


class HandshakeFailed(Exception):
    """The bytes before the upgrade were not a usable WebSocket handshake."""


class ServerWebSocket:
    """One server-side WebSocket. See the module docstring."""

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
        self.on_pong: Callable[[bytes], None] = lambda payload: None
        self._ws = WSConnection(ConnectionType.SERVER)
        self._send_lock = trio.StrictFIFOLock()
        self._events: Iterator[Event] = iter(())
        self._parts: list[str] = []
        self._size = 0
        self._broken = False
        self._deadline = math.inf
        self._write_scope: trio.CancelScope | None = None
        self.close_sent = False
        self.accepted = False
        # The socket's descriptor for `try_send_nowait` (None: not a socket
        # stream, e.g. trio's in-memory streams in tests, or closed).
        sock = getattr(stream, "socket", None)
        self._fd: int | None = sock.fileno() if sock is not None else None

    # -- handshake -----------------------------------------------------------

    async def read_request(self) -> Request:
        """Read until the upgrade request arrives (caller bounds the time).

        Raises HandshakeFailed when the bytes are not a WebSocket upgrade (a
        400 has already been answered) or the peer hung up.
        """
        while True:
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except trio.BrokenResourceError as exc:
                raise HandshakeFailed("connection lost during handshake") from exc
            if not data:
                raise HandshakeFailed("connection closed during handshake")
            try:
                self._ws.receive_data(bytes(data))
                for event in self._ws.events():
                    if isinstance(event, Request):
                        return event
            except RemoteProtocolError as exc:
                await self._send_http_error(400, "not a WebSocket upgrade request\n")
                raise HandshakeFailed(str(exc)) from exc

    async def accept(self, subprotocol: str | None) -> None:
        await self._send(self._ws.send(AcceptConnection(subprotocol=subprotocol)))
        self.accepted = True

    async def reject(self, status: int, body: str) -> None:
        """Answer the upgrade with an HTTP error; no WebSocket opens."""
        payload = body.encode()
        data = self._ws.send(
            RejectConnection(
                status_code=status,
                headers=[
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(payload)).encode()),
                ],
                has_body=True,
            )
        )
        data += self._ws.send(RejectData(data=payload, body_finished=True))
        await self._send(data)

    async def _send_http_error(self, status: int, body: str) -> None:
        payload = body.encode()
        head = (
            f"HTTP/1.1 {status} Bad Request\r\ncontent-type: text/plain\r\n"
            f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n"
        ).encode()
        try:
            await self._send(head + payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    # -- sending -------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        if self._broken:
            raise trio.BrokenResourceError("socket write timed out earlier")
        async with self._send_lock:
            # The write we queued behind may have timed out meanwhile: do not
            # wait out a second send_timeout on the same dead peer.
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

    def set_deadline(self, deadline: float) -> None:
        """No write may run past `deadline` (trio time), the one in flight included.

        A write cut short by it breaks the socket like a send timeout does.
        """
        self._deadline = min(self._deadline, deadline)
        if self._write_scope is not None:
            self._write_scope.deadline = min(self._write_scope.deadline, deadline)

    def try_send_nowait(self, data: bytes) -> int:
        """Write what the socket takes right now, without a task switch.

        Returns the number of bytes written: 0 when the socket buffer is
        full, a write is already in progress (ordering), our close frame was
        sent, or the stream is not a socket. Errors are left for the next
        awaited write to find. The caller must queue whatever was not
        written, ahead of anything else.
        """
        fd = self._fd
        if (
            fd is None
            or not self.accepted
            or self._broken
            or self.close_sent
            or self._send_lock.locked()
        ):
            return 0
        try:
            return os.write(fd, data)
        except OSError:  # BlockingIOError included: the socket is full
            return 0

    async def send_raw_frames(self, data: bytes) -> None:
        """Write ready-made data frames (from `apix_trio.protocol.wire`)."""
        await self._send(data)

    async def send_ping(self, payload: bytes) -> None:
        await self._send(self._ws.send(Ping(payload=payload)))

    async def send_close(self, code: int, reason: str = "") -> None:
        """Send our close frame once; later calls do nothing."""
        if self.close_sent or self._ws.state not in (
            ConnectionState.OPEN,
            ConnectionState.REMOTE_CLOSING,
        ):
            return
        self.close_sent = True
        await self._send(self._ws.send(CloseConnection(code=code, reason=reason)))

    # -- receiving -----------------------------------------------------------

    async def next_message(self) -> str:
        """The next complete text message.

        Raises ProtocolClose (binary frame 1003, too large 1009, malformed
        frames 1002/1007), PeerClosed (close frame or end of stream).
        """
        while True:
            for event in self._events:
                message = await self._handle(event)
                if message is not None:
                    return message
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise PeerClosed(None, "connection lost") from exc
            if not data:
                raise PeerClosed(None, "end of stream")
            self._ws.receive_data(bytes(data))
            # Lazily: wsproto updates its state frame by frame, so pings before
            # a close frame in the same read are still answered (RFC 6455 5.5.2).
            self._events = self._ws.events()

    async def _handle(self, event: Event) -> str | None:
        if isinstance(event, TextMessage):
            self._size += len(event.data.encode()) if not event.data.isascii() else len(event.data)
            if self._size > self.max_message_bytes:
                raise ProtocolClose(CloseCode.MESSAGE_TOO_BIG, "message too large")
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
            if self._ws.state is ConnectionState.OPEN:
                await self._send(self._ws.send(event.response()))
            return None
        if isinstance(event, Pong):
            self.on_pong(bytes(event.payload))
            return None
        if isinstance(event, CloseConnection):
            if self._ws.state is ConnectionState.REMOTE_CLOSING:
                self.close_sent = True
                try:
                    await self._send(self._ws.send(event.response()))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                raise PeerClosed(event.code, event.reason or "")
            if self._ws.state is ConnectionState.CLOSED:
                raise PeerClosed(event.code, event.reason or "")
            # wsproto reports a framing error as a CloseConnection while OPEN.
            raise ProtocolClose(event.code, event.reason or "protocol error")
        return None

    async def aclose(self) -> None:
        """Close the TCP stream (never raises)."""
        self._fd = None  # the descriptor number may be reused at once
        with trio.CancelScope(shield=True):
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
