"""Server-to-client WebSocket frame bytes, built once per message.

Frames a server sends are never masked and, with no extension negotiated
(permessage-deflate is not offered in v1), the bytes of a text frame depend
only on its payload. So an event's frame is built once and the same bytes go
to every subscriber's socket. Control frames and the handshake still go
through wsproto; only data frames are built here.
"""

from __future__ import annotations

import struct

_FIN_TEXT = 0x81


def text_frame(payload: bytes) -> bytes:
    """One complete (FIN) unmasked text frame carrying `payload` (UTF-8)."""
    length = len(payload)
    if length < 126:
        header = bytes((_FIN_TEXT, length))
    elif length < 65536:
        header = struct.pack("!BBH", _FIN_TEXT, 126, length)
    else:
        header = struct.pack("!BBQ", _FIN_TEXT, 127, length)
    return header + payload


def text_frame_str(text: str) -> bytes:
    return text_frame(text.encode())
