"""Latency snapshots in this process's memory (the embedded broker's store).

Semantics are `apix_trio.broker.latency`'s, checked by the same contract
suite as the Redis store. With one node this store only ever holds the
node's own snapshots; it exists so that every broker offers the same
interface (and tests can share one between two trackers).
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from apix_trio.broker.latency import LatencySnapshots


class MemoryLatencySnapshots(LatencySnapshots):
    """See the module docstring. Never raises `BrokerUnavailable`."""

    def __init__(self) -> None:
        self._orgs: dict[str, dict[tuple[int, str], bytes]] = {}

    async def put_many(
        self, node: str, snapshots: Sequence[tuple[str, int, bytes]], oldest_slot: int
    ) -> None:
        await trio.lowlevel.checkpoint()
        for org, slot, payload in snapshots:
            self._orgs.setdefault(org, {})[(slot, node)] = bytes(payload)
        for org in {org for org, _, _ in snapshots}:
            held = self._orgs[org]
            for key in [key for key in held if key[0] < oldest_slot]:
                del held[key]

    async def read(self, org: str, oldest_slot: int) -> list[tuple[int, str, bytes]]:
        await trio.lowlevel.checkpoint()
        held = self._orgs.get(org, {})
        return [
            (slot, node, payload)
            for (slot, node), payload in sorted(held.items())
            if slot >= oldest_slot
        ]
