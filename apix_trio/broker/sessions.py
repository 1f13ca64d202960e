"""Session records: what a connection was subscribed to, kept after it drops.

The interface; memory and Redis implementations live beside it
(`memory_sessions.py`, `redis_sessions.py`) with one contract suite.

A record is keyed by (org, session id) and belongs to one `sub`; it expires
`ttl` seconds after its last save. Resume on any node loads it; the org is
part of the key, so a token of another org can never load it, and the caller
checks `sub`.
"""

from __future__ import annotations

import abc

import attrs


@attrs.frozen
class SessionChannel:
    channel: str
    position: str
    group: str | None = None
    presence: bool = False


@attrs.frozen
class SessionRecord:
    session: str
    sub: str
    channels: tuple[SessionChannel, ...] = ()


class SessionStore(abc.ABC):
    @abc.abstractmethod
    async def save(self, org: str, record: SessionRecord, ttl: float) -> None:
        """Store (replace) the record; it expires `ttl` seconds from now."""

    @abc.abstractmethod
    async def save_many(self, items: list[tuple[str, SessionRecord]], ttl: float) -> None:
        """Store many (org, record) pairs in one round trip (periodic flush)."""

    @abc.abstractmethod
    async def load(self, org: str, session: str) -> SessionRecord | None:
        """The record, or None when unknown or expired."""

    @abc.abstractmethod
    async def delete(self, org: str, session: str) -> None:
        """Forget the record (no error when absent)."""
