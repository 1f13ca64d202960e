"""What every connection of one server shares: settings, broker, router, keys, metrics.

The hub owns no tasks; `apix_trio.server` builds it and runs the services.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import attrs

from apix_trio.auth import Verifier
from apix_trio.broker.base import Broker
from apix_trio.groups import GroupManager
from apix_trio.logs import get_logger
from apix_trio.metrics import Metrics
from apix_trio.namespaces import Namespaces
from apix_trio.router import Router
from apix_trio.sessions import SessionKeeper
from apix_trio.settings import Settings
from apix_trio.slots import ConnectionSlots

if TYPE_CHECKING:
    from apix_trio.connection import Connection


class ConnectionRegistry:
    """Live connections of this node, and per-org counts for the connection cap."""

    def __init__(self) -> None:
        self._by_id: dict[str, Connection] = {}
        self._per_org: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Connection]:
        """A snapshot: connections may close while the caller iterates."""
        return iter(list(self._by_id.values()))

    def get(self, conn_id: str) -> Connection | None:
        return self._by_id.get(conn_id)

    def add(self, conn: Connection) -> None:
        self._by_id[conn.id] = conn

    def discard(self, conn: Connection) -> None:
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


@attrs.define
class Hub:
    settings: Settings
    broker: Broker
    verifier: Verifier
    router: Router = attrs.field(factory=Router)
    metrics: Metrics = attrs.field(factory=Metrics)
    registry: ConnectionRegistry = attrs.field(factory=ConnectionRegistry)
    namespaces: Namespaces = attrs.field(default=None)
    wall_clock: Callable[[], float] = time.time
    rng: random.Random = attrs.field(factory=random.Random)
    accepting: bool = True
    sessions: SessionKeeper = attrs.field(default=None)
    groups: GroupManager = attrs.field(default=None)
    slots: ConnectionSlots = attrs.field(default=None)
    log = get_logger("apix.server")

    def __attrs_post_init__(self) -> None:
        if self.namespaces is None:
            self.namespaces = Namespaces(self.settings)
        if self.sessions is None:
            self.sessions = SessionKeeper.for_broker(self.broker, self.settings.sessions.ttl)
        if self.groups is None:
            self.groups = GroupManager(self)
        if self.slots is None:
            self.slots = ConnectionSlots(
                self.broker.leases,
                self.settings.server.node_id,
                self.settings.limits.max_connections_per_org,
            )
        self.broker.set_listener(self.router.dispatch)

    def wall(self) -> float:
        """Wall-clock seconds (injectable so timer tests run on a MockClock)."""
        return self.wall_clock()
