"""Connection slots: the per-org connection cap, cluster-wide.

`ConnectionSlots` sits between connections and the broker's leases
(`broker/leases.py`). `acquire` is awaited when a connection authenticates;
`release` is synchronous (it is called from a connection's `finally`) and
queues the release for the keeper task, which also refreshes every lease this
node holds every `ttl / 3` seconds. With `limits.max_connections_per_org` at 0
(the default) nothing is leased and nothing touches the backend.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from apix_trio.broker.leases import ConnectionLeases
from apix_trio.broker.model import BrokerUnavailable
from apix_trio.observability.logs import get_logger

LEASE_TTL = 30.0
log = get_logger("apix.slots")


class ConnectionSlots:
    """See the module docstring. One per node."""

    def __init__(self, leases: ConnectionLeases, node_id: str, limit: int) -> None:
        self._leases = leases
        self._node_id = node_id
        self.limit = limit
        self._held: dict[str, str] = {}  # member -> org
        self._release_send, self._release_recv = trio.open_memory_channel[tuple[str, str]](
            math.inf
        )

    def _member(self, conn_id: str) -> str:
        return f"{self._node_id}:{conn_id}"

    async def acquire(self, org: str, conn_id: str) -> bool:
        """Take a slot in `org`; False when the org is at its cap.

        Error handling: BrokerUnavailable when the backend cannot answer.
        """
        if not self.limit:
            return True
        member = self._member(conn_id)
        if not await self._leases.acquire(org, member, self.limit, LEASE_TTL):
            return False
        self._held[member] = org
        return True

    def release(self, conn_id: str) -> None:
        """Give the slot back (synchronous; the keeper tells the backend)."""
        member = self._member(conn_id)
        org = self._held.pop(member, None)
        if org is not None:
            self._release_send.send_nowait((org, member))

    def held(self) -> int:
        return len(self._held)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Refresh held leases every LEASE_TTL / 3 s and apply releases."""
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._refresh_loop)
            async for org, member in self._release_recv:
                await self._quietly(self._leases.release, org, [member])

    async def _refresh_loop(self) -> None:
        while True:
            await trio.sleep(LEASE_TTL / 3)
            by_org: dict[str, list[str]] = defaultdict(list)
            for member, org in self._held.items():
                by_org[org].append(member)
            for org, members in by_org.items():
                await self._quietly(self._leases.refresh, org, members, LEASE_TTL)

    @staticmethod
    async def _quietly(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        try:
            await fn(*args)
        except BrokerUnavailable as exc:
            log.warning("lease_update_failed", error=str(exc))
