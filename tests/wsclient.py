"""A raw JSON client on the `websockets` library (which the server does not use).

`websockets`' sync client runs in a worker thread, so trio tests can drive it
with `await ws.send(...)` / `await ws.recv()` on the real clock.
"""

from __future__ import annotations

from typing import Any

import orjson
import trio
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

RECV_TIMEOUT = 10.0


class RawClient:
    """One WebSocket connection speaking raw frames."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.pushes: list[dict[str, Any]] = []
        self._next_id = 0

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> RawClient:
        conn = await trio.to_thread.run_sync(
            lambda: connect(url, open_timeout=10, legacy=True, **kwargs)
        )
        return cls(conn)

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        if isinstance(frame, dict):
            frame = orjson.dumps(frame).decode()
        await trio.to_thread.run_sync(self.conn.send, frame)

    async def recv(self) -> dict[str, Any]:
        text = await trio.to_thread.run_sync(lambda: self.conn.recv(timeout=RECV_TIMEOUT))
        result: dict[str, Any] = orjson.loads(text)
        return result

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send an op and return its reply; pushes seen meanwhile go to `pushes`."""
        self._next_id += 1
        frame_id = self._next_id
        await self.send({"op": op, "id": frame_id, **fields})
        while True:
            frame = await self.recv()
            if "push" in frame:
                self.pushes.append(frame)
            elif frame.get("id") == frame_id:
                return frame

    async def next_push(self, kind: str = "event") -> dict[str, Any]:
        for index, frame in enumerate(self.pushes):
            if frame["push"] == kind:
                return self.pushes.pop(index)
        while True:
            frame = await self.recv()
            if frame.get("push") == kind:
                return frame
            self.pushes.append(frame)

    async def wait_closed(self) -> tuple[int | None, str]:
        """Read until the server closes; return its close code and reason."""

        def drain() -> None:
            try:
                while True:
                    self.conn.recv(timeout=RECV_TIMEOUT)
            except ConnectionClosed:
                return

        await trio.to_thread.run_sync(drain)
        rcvd = self.conn.protocol.close_rcvd
        return (rcvd.code, rcvd.reason) if rcvd else (None, "")

    async def close(self) -> None:
        await trio.to_thread.run_sync(self.conn.close)
