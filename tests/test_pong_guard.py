"""A server ping that crosses the client's Close frame on the wire.

A raw wsproto server over a real socket answers the client's Close with a
Ping first and its own Close second, so the client reads the ping in
LOCAL_CLOSING, every time. Unguarded, trio-websocket answers it with a pong
that wsproto refuses, and `LocalProtocolError` escapes `open_client` (found
by the chaos campaign). Guarded, the close is clean and nothing follows our
Close on the wire.
"""

from __future__ import annotations

import functools

import trio
import trio_websocket
import wsproto
import wsproto.events as ws_events

from apix_trio.clients import pong_guard
from apix_trio.clients.client import open_client

TIMEOUT = 10
PING_6 = b"\x89\x016"  # FIN + ping opcode, unmasked, 1 byte of payload: "6"


class PingOnCloseServer:
    """One connection at a time: handshake, one ping while open (answered by
    the client), then a ping in reply to the client's Close, then its Close."""

    def __init__(self) -> None:
        self.after_client_close: list[ws_events.Event] = []
        self.pongs_while_open: list[bytes] = []

    async def handle(self, stream: trio.SocketStream) -> None:
        ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        client_closed = False
        async with stream:
            while ws.state is not wsproto.ConnectionState.CLOSED:
                data = await stream.receive_some(65536)
                if not data:
                    return
                ws.receive_data(data)
                for event in ws.events():
                    if client_closed:
                        self.after_client_close.append(event)
                    elif isinstance(event, ws_events.Request):
                        await stream.send_all(ws.send(ws_events.AcceptConnection()))
                        await stream.send_all(ws.send(ws_events.Ping(b"open")))
                    elif isinstance(event, ws_events.Pong):
                        self.pongs_while_open.append(bytes(event.payload))
                    elif isinstance(event, ws_events.CloseConnection):
                        client_closed = True
                        # wsproto will not ping in REMOTE_CLOSING: frame it by hand
                        await stream.send_all(PING_6)
                        await stream.send_all(ws.send(event.response()))


async def test_a_ping_crossing_the_close_ends_the_client_cleanly() -> None:
    assert pong_guard.install()
    server = PingOnCloseServer()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(TIMEOUT):
            for _ in range(3):
                async with open_client(
                    f"ws://127.0.0.1:{port}/ws", "unused", authenticate=False, subprotocol=None
                ):
                    pass
        nursery.cancel_scope.cancel()
    assert server.after_client_close == []  # no pong after the client's Close
    assert len(server.pongs_while_open) <= 3  # open pings may race the close: no error


async def test_a_ping_while_open_is_still_answered() -> None:
    assert pong_guard.install()
    pongs: list[bytes] = []

    async def handle(stream: trio.SocketStream) -> None:
        ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        async with stream:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, ws_events.Request):
                        await stream.send_all(ws.send(ws_events.AcceptConnection()))
                        await stream.send_all(ws.send(ws_events.Ping(b"hello")))
                    elif isinstance(event, ws_events.Pong):
                        pongs.append(bytes(event.payload))
                        await stream.send_all(ws.send(ws_events.TextMessage("pong seen")))
                    elif isinstance(event, ws_events.CloseConnection):
                        await stream.send_all(ws.send(event.response()))
                        return

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(TIMEOUT):
            async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
                assert await ws.get_message() == "pong seen"
        nursery.cancel_scope.cancel()
    assert pongs == [b"hello"]


def test_install_is_idempotent() -> None:
    assert pong_guard.install()
    handler = trio_websocket.WebSocketConnection._handle_ping_event
    assert pong_guard.install()
    assert trio_websocket.WebSocketConnection._handle_ping_event is handler
