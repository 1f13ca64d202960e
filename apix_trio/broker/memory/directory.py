"""The connection directory of the embedded broker (one process; see
`broker/directory.py`). Leases run on the broker's wall clock, like Redis'
TIME; every coroutine checkpoints first and then runs without awaiting."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs
import trio

from apix_trio.broker.directory import (
    ConnectionDirectory,
    ConnectionListing,
    ConnectionRecord,
    NodeLease,
)


@attrs.define(eq=False)
class _Org:
    leases: dict[str, float] = attrs.field(factory=dict)
    """lease member -> expiry (wall seconds)"""
    records: dict[str, tuple[str, ConnectionRecord]] = attrs.field(factory=dict)
    """conn -> (lease member, record)"""


class MemoryDirectory(ConnectionDirectory):
    def __init__(self, wall_clock: Callable[[], float]) -> None:
        self._clock = wall_clock
        self._orgs: dict[str, _Org] = {}

    def _org(self, org: str) -> _Org:
        return self._orgs.setdefault(org, _Org())

    async def add(
        self, org: str, lease: NodeLease, records: Sequence[ConnectionRecord], ttl: float
    ) -> None:
        await trio.lowlevel.checkpoint()
        state = self._org(org)
        state.leases[lease.member] = self._clock() + ttl
        for record in records:
            state.records[record.conn] = (lease.member, record)

    async def remove(self, org: str, conns: Sequence[str]) -> None:
        await trio.lowlevel.checkpoint()
        state = self._orgs.get(org)
        if state is None:
            return
        for conn in conns:
            state.records.pop(conn, None)
        self._forget_if_empty(org, state)

    async def refresh(self, org: str, lease: NodeLease, ttl: float) -> bool:
        await trio.lowlevel.checkpoint()
        state = self._org(org)
        now = self._clock()
        alive = state.leases.get(lease.member, now) > now
        state.leases[lease.member] = now + ttl
        return alive

    async def release(self, org: str, lease: NodeLease) -> None:
        await trio.lowlevel.checkpoint()
        state = self._orgs.get(org)
        if state is not None:
            state.leases.pop(lease.member, None)
            self._drop_lapsed(state)
            self._forget_if_empty(org, state)

    async def find(
        self,
        org: str,
        *,
        sub: str | None = None,
        conn: str | None = None,
        exclude_node: str | None = None,
        limit: int = 100,
    ) -> ConnectionListing:
        await trio.lowlevel.checkpoint()
        state = self._orgs.get(org)
        if state is None:
            return ConnectionListing((), 0)
        self._drop_lapsed(state)
        matches = sorted(
            (
                record
                for _, record in state.records.values()
                if (sub is None or record.sub == sub)
                and (conn is None or record.conn == conn)
                and (exclude_node is None or record.node != exclude_node)
            ),
            key=lambda record: (record.since, record.conn),
        )
        self._forget_if_empty(org, state)
        return ConnectionListing(tuple(matches[: max(limit, 0)]), len(matches))

    def _drop_lapsed(self, state: _Org) -> None:
        now = self._clock()
        for member, until in list(state.leases.items()):
            if until <= now:
                del state.leases[member]
        for conn, (member, _) in list(state.records.items()):
            if member not in state.leases:
                del state.records[conn]

    def _forget_if_empty(self, org: str, state: _Org) -> None:
        if not state.records and not state.leases:
            self._orgs.pop(org, None)
