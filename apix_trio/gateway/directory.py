"""This node's side of the connection directory (`broker/directory.py`).

`DirectoryKeeper.opened` / `closed` are synchronous (a connection calls
them when it authenticates and in its `finally`); they update the node's own
view at once (`local`, exact for this node) and mark the org dirty. The
keeper task writes the changes, one batch per org, as soon as it wakes, and
extends this node's lease in every org it holds connections of every
`ttl / 3` seconds (`ttl` is `presence.ttl`). A lease that had lapsed
(the backend was unreachable for longer than `ttl`) is answered by
registering the org's connections again.

While the backend is down the changes stay queued and are retried every
`RETRY` seconds; on exit the node's leases are released (bounded by
`EXIT_WAIT`), so its records stop counting at once.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from apix_trio.broker.directory import ConnectionDirectory, ConnectionRecord, NodeLease
from apix_trio.broker.model import BrokerUnavailable
from apix_trio.observability.logs import get_logger

RETRY = 1.0
EXIT_WAIT = 1.0

log = get_logger("apix.directory")


class DirectoryKeeper:
    """See the module docstring. One per node."""

    def __init__(
        self,
        directory: ConnectionDirectory,
        node_id: str,
        ttl: float,
        wall_clock: Callable[[], float],
    ) -> None:
        self._directory = directory
        self.lease = NodeLease(node_id)
        self.ttl = ttl
        self._wall = wall_clock
        self._local: dict[str, dict[str, ConnectionRecord]] = {}
        self._orgs_of: dict[str, str] = {}  # conn -> org
        self._added: dict[str, set[str]] = {}
        self._removed: dict[str, set[str]] = {}
        self._leased: set[str] = set()  # orgs this node has written a lease in
        self._wake = trio.Event()

    @property
    def node(self) -> str:
        return self.lease.node

    def opened(self, conn: str, org: str, sub: str) -> None:
        """A connection authenticated (synchronous)."""
        record = ConnectionRecord(conn, sub, self.lease.node, int(self._wall() * 1000))
        self._local.setdefault(org, {})[conn] = record
        self._orgs_of[conn] = org
        self._added.setdefault(org, set()).add(conn)
        self._removed.get(org, set()).discard(conn)
        self._wake.set()

    def closed(self, conn: str) -> None:
        """A connection ended (synchronous; unknown ids are ignored)."""
        org = self._orgs_of.pop(conn, None)
        if org is None:
            return
        records = self._local.get(org, {})
        records.pop(conn, None)
        if not records:
            self._local.pop(org, None)
        added = self._added.get(org)
        if added is not None and conn in added:
            added.discard(conn)  # never written: nothing to remove
        else:
            self._removed.setdefault(org, set()).add(conn)
        self._wake.set()

    def local(self, org: str) -> list[ConnectionRecord]:
        """This node's authenticated connections of `org`."""
        return list(self._local.get(org, {}).values())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write changes and refresh leases until cancelled (see the module docstring)."""
        task_status.started()
        try:
            next_refresh = trio.current_time() + self.ttl / 3
            while True:
                with trio.move_on_at(next_refresh):
                    await self._wake.wait()
                self._wake = trio.Event()
                try:
                    await self._flush()
                    if trio.current_time() >= next_refresh:
                        await self._refresh()
                        next_refresh = trio.current_time() + self.ttl / 3
                except BrokerUnavailable as exc:
                    log.warning("directory_update_failed", error=str(exc))
                    await trio.sleep(RETRY)
                    self._wake.set()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(EXIT_WAIT):
                await self._release_all()

    async def _flush(self) -> None:
        for org in list(self._removed):
            conns = self._removed.pop(org)
            try:
                await self._directory.remove(org, sorted(conns))
            except BaseException:
                self._removed.setdefault(org, set()).update(conns)
                raise
        for org in list(self._added):
            conns = self._added.pop(org)
            records = [self._local[org][c] for c in conns if c in self._local.get(org, {})]
            try:
                if records:
                    await self._directory.add(org, self.lease, records, self.ttl)
                    self._leased.add(org)
            except BaseException:
                self._added.setdefault(org, set()).update(conns)
                raise

    async def _refresh(self) -> None:
        for org in list(self._local):
            if not await self._directory.refresh(org, self.lease, self.ttl):
                log.warning("directory_lease_lapsed", org=org)
                self._added.setdefault(org, set()).update(self._local.get(org, {}))
                self._wake.set()

    async def _release_all(self) -> None:
        for org in sorted(self._leased):
            try:
                await self._directory.release(org, self.lease)
            except BrokerUnavailable:
                return
