"""A small real HTTP/1.1 client for the HTTP API tests (h11 over a trio TCP stream).

`http_request(port, method, path, json=..., token=..., headers=...)` opens a
connection to 127.0.0.1, sends one request (a `json` body, raw `body`
bytes, or `chunks` sent with chunked transfer encoding) and returns a
`Reply`: status, headers (lower-case names), body bytes, and `.json()`.
"""

from __future__ import annotations

from typing import Any

import attrs
import h11
import orjson
import trio

MAX_RESPONSE = 8 << 20


@attrs.frozen
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        return dict(self.json()["error"])


async def http_request(
    port: int,
    method: str,
    path: str,
    *,
    json: Any = attrs.NOTHING,
    body: bytes | None = None,
    chunks: list[bytes] | None = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    within: float = 10.0,
) -> Reply:
    """One request on a fresh connection (see the module docstring)."""
    sent: dict[str, str] = {"host": "127.0.0.1"}
    if token is not None:
        sent["authorization"] = f"Bearer {token}"
    if json is not attrs.NOTHING:
        body = orjson.dumps(json)
        sent["content-type"] = "application/json"
    if body is not None:
        sent["content-length"] = str(len(body))
    if chunks is not None:
        sent["transfer-encoding"] = "chunked"
        sent.setdefault("content-type", "application/json")
    sent.update({k.lower(): v for k, v in (headers or {}).items()})
    with trio.fail_after(within):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(method=method, target=path, headers=list(sent.items()))
            await stream.send_all(conn.send(request) or b"")
            try:
                if body is not None:
                    await stream.send_all(conn.send(h11.Data(data=body)) or b"")
                for chunk in chunks or ():
                    await stream.send_all(conn.send(h11.Data(data=chunk)) or b"")
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
            except trio.BrokenResourceError:
                pass  # the server answered before taking the whole body
            return await _read_reply(stream, conn)


async def _read_reply(stream: trio.SocketStream, conn: h11.Connection) -> Reply:
    status = 0
    headers: dict[str, str] = {}
    data = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            chunk = await stream.receive_some(65536)
            conn.receive_data(chunk)
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode().lower(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            data += event.data
            assert len(data) <= MAX_RESPONSE
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return Reply(status, headers, data)
