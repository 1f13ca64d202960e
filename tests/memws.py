"""A wsproto client over trio's in-memory streams, for MockClock tests.

No sockets, no threads: with `MockClock(autojump_threshold=0)` every timer of
the server (auth timeout, heartbeat, token expiry) fires at an exact virtual
time the test can assert.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    Ping,
    Request,
    TextMessage,
)

from apix_trio.auth.devkeys import ensure_dev_keys, mint_token
from apix_trio.auth.keys import KeyStore, Verifier
from apix_trio.broker.memory.events import open_memory_broker
from apix_trio.commands.dispatch import run_command
from apix_trio.gateway.handshake import handle_stream
from apix_trio.gateway.hub import Hub
from apix_trio.settings import Settings
from tests.serverkit import make_settings

BASE_WALL = 1_800_000_000.0


def fake_wall() -> float:
    return BASE_WALL + trio.current_time()


@attrs.define
class MemHub:
    hub: Hub
    key_path: Path
    nursery: trio.Nursery

    def token(self, org: str = "acme", sub: str = "alice", ttl: int = 3600, **kw: Any) -> str:
        kw.setdefault("pub", (">",))
        kw.setdefault("sub_patterns", (">",))
        return mint_token(self.key_path, org=org, sub=sub, ttl=ttl, now=fake_wall(), **kw)

    async def connect(self, *, headers: list[tuple[bytes, bytes]] | None = None) -> MemClient:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        self.nursery.start_soon(handle_stream, self.hub, server_stream)
        client = MemClient(client_stream)
        await client.handshake(headers or [])
        return client


@asynccontextmanager
async def memory_hub(tmp_path: Path, **sections: Any) -> AsyncIterator[MemHub]:
    settings: Settings = make_settings(tmp_path, **sections)
    private, _, _ = ensure_dev_keys(settings.auth.dev_key_dir)
    keys = KeyStore(settings.auth)
    async with open_memory_broker(wall_clock=fake_wall) as broker:
        hub = Hub(
            settings=settings,
            broker=broker,
            verifier=Verifier(settings.auth, keys),
            wall_clock=fake_wall,
            commands=run_command,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.groups.run)  # consumer-group delivery
            await nursery.start(hub.presence.run)  # leaves of closed connections, reaping
            await nursery.start(hub.audit.serve)  # the audit trail's writer
            await nursery.start(hub.timers.serve)  # connection timers
            await nursery.start(hub.coalescer.serve)  # socket writes
            yield MemHub(hub, Path(private), nursery)
            nursery.cancel_scope.cancel()


class MemClient:
    """Client side of one WebSocket; answers pings only when told to."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.answer_pings = True
        self.pings: list[float] = []
        self.close_code: int | None = None
        self.close_time: float | None = None
        self._pending: list[Any] = []
        self._next_id = 0

    async def handshake(self, headers: list[tuple[bytes, bytes]]) -> None:
        await self.stream.send_all(
            self.ws.send(Request(host="test", target="/ws", extra_headers=headers))
        )
        while True:
            event = await self._next_event()
            if isinstance(event, AcceptConnection):
                return
            raise AssertionError(f"handshake failed: {event!r}")

    async def _next_event(self) -> Any:
        while not self._pending:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)
            self._pending.extend(self.ws.events())
        return self._pending.pop(0)

    async def send(self, frame: dict[str, Any] | str) -> None:
        text = frame if isinstance(frame, str) else orjson.dumps(frame).decode()
        await self.stream.send_all(self.ws.send(Message(data=text)))

    async def recv(self, *, until: Callable[[], bool] | None = None) -> dict[str, Any] | None:
        """The next JSON frame, or None once the server has closed (or
        `until()` became true after handling a control frame)."""
        parts: list[str] = []
        while True:
            if self.close_code is not None or (until is not None and until()):
                return None
            event = await self._next_event()
            if isinstance(event, Ping):
                self.pings.append(trio.current_time())
                if self.answer_pings:
                    await self.stream.send_all(self.ws.send(event.response()))
            elif isinstance(event, TextMessage):
                parts.append(event.data)
                if event.message_finished:
                    result: dict[str, Any] = orjson.loads("".join(parts))
                    return result
            elif isinstance(event, CloseConnection):
                self.close_code = event.code
                self.close_time = trio.current_time()
                try:
                    await self.stream.send_all(self.ws.send(event.response()))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                return None

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        self._next_id += 1
        await self.send({"op": op, "id": self._next_id, **fields})
        while True:
            frame = await self.recv()
            assert frame is not None, f"closed with {self.close_code} while waiting for {op}"
            if frame.get("id") == self._next_id:
                return frame

    async def until_closed(self) -> list[dict[str, Any]]:
        """Read (answering pings as configured) until the server closes."""
        frames = []
        while (frame := await self.recv()) is not None:
            frames.append(frame)
        return frames
