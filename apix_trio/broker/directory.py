"""The connection directory: every authenticated connection of an org, on every node.

The interface; the embedded implementation is `memory/directory.py`, the
Redis one `redis/directory.py`. One contract suite
(`tests/test_directory_contract.py`) runs against both.

Theory of operation
-------------------
Each node registers its authenticated connections (`conn -> sub, node,
since`) under a *node lease* per org: a record counts only while the lease
of the node incarnation that wrote it is alive. A node extends its leases
(`refresh`) every `ttl / 3` seconds; a node that dies stops doing so, and
within `ttl` every record it wrote stops counting, without anybody cleaning
up (the next `find` that meets them deletes them). A lease carries the
node's incarnation (a random token per process), so a restarted node with
the same `node_id` never revives its previous life's records.

`refresh` answers False when the lease had already lapsed (the node was cut
off from the backend for longer than `ttl`): its records may have been
deleted, and the node registers its live connections again.

Error handling: every method of the Redis implementation raises
`BrokerUnavailable` for backend trouble; the embedded one never does.
"""

from __future__ import annotations

import abc
import secrets
from collections.abc import Sequence

import attrs


@attrs.frozen
class NodeLease:
    """One node incarnation: `node` is the `server.node_id`."""

    node: str
    incarnation: str = attrs.field(factory=lambda: secrets.token_hex(6))

    @property
    def member(self) -> str:
        return f"{self.node}#{self.incarnation}"


@attrs.frozen
class ConnectionRecord:
    """A connection as the directory lists it; `since` is Unix milliseconds."""

    conn: str
    sub: str
    node: str
    since: int


@attrs.frozen
class ConnectionListing:
    """Up to `limit` matching records ordered by (`since`, `conn`); `total`
    counts every match."""

    records: tuple[ConnectionRecord, ...]
    total: int


class ConnectionDirectory(abc.ABC):
    """See the module docstring."""

    @abc.abstractmethod
    async def add(
        self, org: str, lease: NodeLease, records: Sequence[ConnectionRecord], ttl: float
    ) -> None:
        """Register `records` (held by `lease.node`) and extend the node's
        lease in `org` to now + `ttl` seconds."""

    @abc.abstractmethod
    async def remove(self, org: str, conns: Sequence[str]) -> None:
        """Forget these connections (unknown ones are ignored)."""

    @abc.abstractmethod
    async def refresh(self, org: str, lease: NodeLease, ttl: float) -> bool:
        """Extend the node's lease in `org` to now + `ttl`; False when it had
        lapsed (register the node's connections again)."""

    @abc.abstractmethod
    async def release(self, org: str, lease: NodeLease) -> None:
        """End the node's lease in `org` at once: its records stop counting."""

    @abc.abstractmethod
    async def find(
        self,
        org: str,
        *,
        sub: str | None = None,
        conn: str | None = None,
        exclude_node: str | None = None,
        limit: int = 100,
    ) -> ConnectionListing:
        """Records of live leases in `org` matching `sub` and `conn` (when
        given) and not held by `exclude_node`; records of lapsed leases are
        deleted on the way."""
