"""A minimal HTTP/1.1 client on trio for tests of the internal HTTP listener.

`http_request(port, method, path, body=..., headers=...)` sends one request
to 127.0.0.1 with `Connection: close` and returns an `HttpAnswer` (status,
lower-cased headers, body bytes). Enough for hypercorn's answers, which
carry a content length; nothing here is chunked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import orjson
import trio

MAX_RESPONSE = 4 << 20


@attrs.frozen
class HttpAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


async def http_request(
    port: int,
    method: str,
    path: str,
    *,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
) -> HttpAnswer:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    data = b""
    try:
        await stream.send_all(request)
        while len(data) < MAX_RESPONSE:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                length = _header(head, "content-length")
                if length is not None and len(rest) >= int(length):
                    break
    finally:
        await stream.aclose()
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    answer_headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        answer_headers[name.strip().lower()] = value.strip()
    return HttpAnswer(int(status_line.split(" ", 2)[1]), answer_headers, rest)


def _header(head: bytes, name: str) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.encode():
            return value.strip().decode("latin-1")
    return None
