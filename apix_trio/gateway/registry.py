"""The node's live connections (the ConnectionManager's registry) and per-org counts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from apix_trio.auth.identity import Identity


class Registered(Protocol):
    """A connection as the registry and its readers (shutdown, admin
    disconnect, statistics) see it; `gateway.connection.Connection` is one."""

    @property
    def id(self) -> str: ...

    @property
    def identity(self) -> Identity | None: ...

    def request_close(self, code: int, reason: str | None = None, *, flush: bool = True) -> None:
        ...

    def cut_writes_at(self, deadline: float) -> None:
        """End any socket write still in progress at trio time `deadline`."""
        ...


class ConnectionRegistry:
    """Live connections of this node, and per-org counts for the connection cap."""

    def __init__(self) -> None:
        self._by_id: dict[str, Registered] = {}
        self._per_org: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Registered]:
        """A snapshot: connections may close while the caller iterates."""
        return iter(list(self._by_id.values()))

    def get(self, conn_id: str) -> Registered | None:
        return self._by_id.get(conn_id)

    def add(self, conn: Registered) -> None:
        self._by_id[conn.id] = conn

    def discard(self, conn: Registered) -> None:
        self._by_id.pop(conn.id, None)

    def org_count(self, org: str) -> int:
        return self._per_org.get(org, 0)

    def try_join_org(self, org: str, limit: int) -> bool:
        """Count one more authenticated connection in `org` unless at `limit` (0 = none)."""
        count = self._per_org.get(org, 0)
        if limit and count >= limit:
            return False
        self._per_org[org] = count + 1
        return True

    def leave_org(self, org: str) -> None:
        count = self._per_org.get(org, 0) - 1
        if count > 0:
            self._per_org[org] = count
        else:
            self._per_org.pop(org, None)
