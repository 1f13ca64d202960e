"""The WebSocket upgrade request, parsed without h11 (sans-IO).

Theory of operation
-------------------
A WebSocket handshake is one HTTP/1.1 GET with no body, answered by one
status line and a few headers; a full HTTP state machine (h11, under
wsproto's handshake) is several times the work and keeps its state for the
connection's lifetime. `parse_upgrade` checks what RFC 6455 4.2.1 and
RFC 9110/9112 require of the request, the same rules wsproto's handshake
applied (GET, HTTP/1.1, `Host`, `Connection: upgrade`, `Upgrade:
websocket`, `Sec-WebSocket-Version: 13`, a `Sec-WebSocket-Key`), plus the
message syntax h11 enforced (request line, header names as tokens, no
control characters in values, no obsolete line folding, no body) and the
size limit (`MAX_HEAD`, 16 KiB, h11's default). Any breach raises
`BadUpgrade` with the status to answer (400). The result holds only what
the gateway's checks read; nothing of it is kept after the upgrade.
"""

from __future__ import annotations

import base64
import hashlib
import re

MAX_HEAD = 16 * 1024
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/(\d)\.(\d)")

REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    429: "Too Many Requests",
    503: "Service Unavailable",
}


class BadUpgrade(Exception):
    """The bytes are not a usable WebSocket upgrade request."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class UpgradeRequest:
    """What the gateway checks of an upgrade request.

    `extra_headers` are (lower-case name, value) pairs, as wsproto's
    `Request.extra_headers` were; `subprotocols` is the offered list.
    """

    __slots__ = ("extra_headers", "host", "key", "subprotocols", "target")

    def __init__(
        self,
        target: str,
        host: str,
        key: bytes,
        subprotocols: list[str],
        extra_headers: list[tuple[bytes, bytes]],
    ) -> None:
        self.target = target
        self.host = host
        self.key = key
        self.subprotocols = subprotocols
        self.extra_headers = extra_headers

    def header(self, name: bytes) -> str | None:
        """The first header named `name` (lower case), decoded as latin-1."""
        for key, value in self.extra_headers:
            if key == name:
                return value.decode("latin-1")
        return None


def head_end(buffer: bytes | bytearray) -> int:
    """Index just past the blank line ending the request head, or -1.

    Raises BadUpgrade when no end is in sight within MAX_HEAD bytes.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD:
            raise BadUpgrade("request header too large")
        return -1
    if end + 4 > MAX_HEAD:
        raise BadUpgrade("request header too large")
    return end + 4


def _comma_list(value: bytes) -> list[str]:
    return [part.strip() for part in value.decode("latin-1").split(",") if part.strip()]


def parse_upgrade(head: bytes) -> UpgradeRequest:
    """Parse a complete request head (through the blank line).

    Error handling: BadUpgrade (status 400) for anything that is not a
    well-formed WebSocket upgrade.
    """
    lines = head[:-4].split(b"\r\n")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise BadUpgrade("malformed request line")
    method, target, major, minor = match.groups()
    if (major, minor) != (b"1", b"1"):
        raise BadUpgrade("HTTP/1.1 required")
    if method != b"GET":
        raise BadUpgrade("request method must be GET")
    host: str | None = None
    key: bytes | None = None
    version: bytes | None = None
    upgrade = b""
    connection: list[str] | None = None
    subprotocols: list[str] = []
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            raise BadUpgrade("malformed header line")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value) is not None:
            raise BadUpgrade("invalid character in a header value")
        name = name.lower()
        if name == b"host":
            if host is not None:
                raise BadUpgrade("more than one Host header")
            host = value.decode("latin-1")
            continue
        if name == b"sec-websocket-protocol":
            subprotocols.extend(_comma_list(value))
            continue
        if name == b"sec-websocket-extensions":
            continue  # none is negotiated in v1
        if name == b"connection":
            connection = (connection or []) + _comma_list(value)
        elif name == b"upgrade":
            upgrade = value
        elif name == b"sec-websocket-key":
            key = value
        elif name == b"sec-websocket-version":
            version = value
        elif name == b"content-length":
            if value.strip() != b"0":
                raise BadUpgrade("an upgrade request has no body")
        elif name == b"transfer-encoding":
            raise BadUpgrade("an upgrade request has no body")
        headers.append((name, value))
    if connection is None or not any(token.lower() == "upgrade" for token in connection):
        raise BadUpgrade("missing header 'Connection: Upgrade'")
    if version != b"13":
        raise BadUpgrade("missing header 'Sec-WebSocket-Version: 13'")
    if not key:
        raise BadUpgrade("missing header 'Sec-WebSocket-Key'")
    if upgrade.lower() != b"websocket":
        raise BadUpgrade("missing header 'Upgrade: websocket'")
    if host is None:
        raise BadUpgrade("missing header 'Host'")
    return UpgradeRequest(target.decode("ascii"), host, key, subprotocols, headers)


def accept_token(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + WEBSOCKET_GUID).digest())


def accept_response(key: bytes, subprotocol: str | None) -> bytes:
    """The 101 answer to a valid upgrade request."""
    protocol = f"Sec-WebSocket-Protocol: {subprotocol}\r\n".encode() if subprotocol else b""
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_token(key) + b"\r\n" + protocol + b"\r\n"
    )


def error_response(status: int, body: str) -> bytes:
    """A complete HTTP error answer; the connection closes after it."""
    payload = body.encode()
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
        "content-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + payload
