"""Connection leases: the cluster-wide `limits.max_connections_per_org` count.

Every authenticated connection of an org that has a cap holds a lease named
`<node_id>:<conn id>` that expires `ttl` seconds after it was last refreshed.
The count of an org is the number of unexpired leases, so connections of a
node that crashed stop counting within `ttl` without anybody cleaning up.

The interface and the embedded implementation live here; the Redis one is
`redis/leases.py` (a sorted set per org, scored by expiry).

Error handling: the Redis implementation raises `BrokerUnavailable`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence


class ConnectionLeases(abc.ABC):
    @abc.abstractmethod
    async def acquire(self, org: str, member: str, limit: int, ttl: float) -> bool:
        """Take a lease unless `org` already holds `limit` live ones."""

    @abc.abstractmethod
    async def refresh(self, org: str, members: Sequence[str], ttl: float) -> None:
        """Push the expiry of `members` (held by this node) to now + ttl."""

    @abc.abstractmethod
    async def release(self, org: str, members: Sequence[str]) -> None:
        """Drop leases (no error for unknown members)."""

    @abc.abstractmethod
    async def count(self, org: str) -> int:
        """Live leases of `org`."""


class MemoryLeases(ConnectionLeases):
    """Leases of one process (the embedded broker)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._orgs: dict[str, dict[str, float]] = {}

    def _live(self, org: str) -> dict[str, float]:
        now = self._clock()
        leases = self._orgs.get(org, {})
        expired = [member for member, until in leases.items() if until <= now]
        for member in expired:
            del leases[member]
        return leases

    async def acquire(self, org: str, member: str, limit: int, ttl: float) -> bool:
        leases = self._live(org)
        if member not in leases and len(leases) >= limit:
            return False
        self._orgs.setdefault(org, leases)[member] = self._clock() + ttl
        return True

    async def refresh(self, org: str, members: Sequence[str], ttl: float) -> None:
        leases = self._orgs.get(org)
        if leases is not None:
            until = self._clock() + ttl
            for member in members:
                if member in leases:
                    leases[member] = until

    async def release(self, org: str, members: Sequence[str]) -> None:
        leases = self._orgs.get(org)
        if leases is None:
            return
        for member in members:
            leases.pop(member, None)
        if not leases:
            del self._orgs[org]

    async def count(self, org: str) -> int:
        return len(self._live(org))
