"""Session records: what a connection was subscribed to, kept after it drops.

The interface; memory and Redis implementations live beside it
(`memory/sessions.py`, `redis/sessions.py`) with one contract suite
(`tests/test_sessions_store.py`).

A record is keyed by (org, session id) and belongs to one `sub`; it expires
`ttl` seconds after its last save. Resume on any node loads it; the org is
part of the key, so a token of another org can never load it, and the caller
checks `sub`.

Fencing: a record carries an `epoch`, incremented by every resume. A save
whose epoch is lower than the stored one is ignored, so a connection that
lingers on one node (its server has not yet noticed the client is gone) can
never overwrite what the resumed connection on another node saved, not even
with its final record when it finally closes.

The record codec (`encode_record` / `decode_record`, compact JSON) is pure and
shared by the stores that keep records as text.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import attrs
import orjson


@attrs.frozen
class SessionChannel:
    """One subscription of a session: `position` is the id of the last event
    the server sent to the socket on this channel, or the point the
    subscription started from (its `since`, else its subscribe `position`)
    when it sent none. Group subscriptions carry their `group`."""

    channel: str
    position: str
    group: str | None = None
    presence: bool = False


@attrs.frozen
class SessionRecord:
    session: str
    sub: str
    channels: tuple[SessionChannel, ...] = ()
    epoch: int = 0
    """Incremented by every resume; see the module docstring (fencing)."""
    conn: str = ""
    """The id of the connection that saved the record last (a resume
    removes that connection from presence: its successor joins instead)."""
    state: tuple[str, ...] = ()
    """Subscribed state keys (restored on resume with their current values)."""


class SessionStore(abc.ABC):
    """Where session records live between connections.

    Error handling: every method raises `BrokerUnavailable` for backend
    trouble (never for an unknown or expired session).
    """

    @abc.abstractmethod
    async def save(self, org: str, record: SessionRecord, ttl: float) -> bool:
        """Store (replace) the record; it expires `ttl` seconds from now.

        Returns False, storing nothing, when the stored record has a higher
        `epoch` (a newer connection owns the session now).
        """

    @abc.abstractmethod
    async def save_many(self, items: Sequence[tuple[str, SessionRecord]], ttl: float) -> int:
        """`save` many (org, record) pairs, batched into as few round trips as
        the backend allows (the periodic flush). Returns how many were stored.

        Not atomic as a whole: on BrokerUnavailable some may be stored.
        """

    @abc.abstractmethod
    async def load(self, org: str, session: str) -> SessionRecord | None:
        """The record, or None when unknown or expired."""

    @abc.abstractmethod
    async def delete(self, org: str, session: str) -> None:
        """Forget the record (no error when absent)."""


def encode_record(record: SessionRecord) -> bytes:
    """Compact JSON of the record (the `session` id is the key's, not repeated)."""
    channels = [
        _drop_defaults({"c": c.channel, "p": c.position, "g": c.group, "r": c.presence})
        for c in record.channels
    ]
    fields: dict[str, Any] = {"u": record.sub, "e": record.epoch, "ch": channels}
    if record.conn:
        fields["n"] = record.conn
    if record.state:
        fields["st"] = record.state
    return orjson.dumps(fields)


def decode_record(session: str, data: bytes | str) -> SessionRecord | None:
    """The record encoded by `encode_record`, or None for anything malformed
    (a record written by a future version, or by hand)."""
    try:
        raw = orjson.loads(data)
        channels = tuple(
            SessionChannel(
                channel=str(item["c"]),
                position=str(item["p"]),
                group=None if item.get("g") is None else str(item["g"]),
                presence=bool(item.get("r", False)),
            )
            for item in raw["ch"]
        )
        state = tuple(str(key) for key in raw.get("st", ()))  # absent in older records
        return SessionRecord(
            session=session,
            sub=str(raw["u"]),
            channels=channels,
            epoch=int(raw["e"]),
            conn=str(raw.get("n", "")),
            state=state,
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None


def _drop_defaults(fields: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value not in (None, False)}
