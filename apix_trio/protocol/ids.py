"""Event ids: Redis stream ids `<ms>-<seq>`, compared as integer pairs.

Pure functions; both brokers and the subscription seam use them.
"""

from __future__ import annotations

import re

StreamId = tuple[int, int]

ZERO: StreamId = (0, 0)
ZERO_TEXT = "0-0"
_ID_RE = re.compile(r"^(0|[1-9][0-9]{0,19})-(0|[1-9][0-9]{0,19})$")
_MAX = 2**64 - 1


class BadStreamId(ValueError):
    """The text is not a `<ms>-<seq>` id (or "0")."""


def parse_id(text: str) -> StreamId:
    """Parse `<ms>-<seq>`, or `"0"` meaning before everything.

    Raises BadStreamId for anything else, including values beyond 64 bits.
    """
    if text == "0":
        return ZERO
    match = _ID_RE.match(text)
    if match is None:
        raise BadStreamId(f"not an event id: {text[:40]!r}")
    ms, seq = int(match.group(1)), int(match.group(2))
    if ms > _MAX or seq > _MAX:
        raise BadStreamId(f"event id out of range: {text[:40]!r}")
    return ms, seq


def format_id(stream_id: StreamId) -> str:
    return f"{stream_id[0]}-{stream_id[1]}"


def next_id(last: StreamId, now_ms: int) -> StreamId:
    """The id Redis `XADD *` would give after `last` at wall time `now_ms`."""
    if now_ms > last[0]:
        return now_ms, 0
    return last[0], last[1] + 1
