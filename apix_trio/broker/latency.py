"""Latency snapshots: where nodes share their per-org latency sketches.

The interface; memory and Redis implementations live beside it
(`memory/latency.py`, `redis/latency.py`) with one contract suite
(`tests/test_latency.py`). The tracker that writes and merges them is
`apix_trio.observability.latency` (it holds this interface as its
`LatencyStore` protocol).

A snapshot is an opaque payload (a slot's whole sketch) keyed by (org,
slot, node): writing one again replaces it, so writes are idempotent.
`put_many` also forgets every snapshot of the orgs it writes whose slot is
older than `oldest_slot`; the Redis store additionally lets an org's
snapshots expire `SNAPSHOT_TTL` seconds after its last write, so orgs that
went quiet leave nothing behind.

Error handling: every method raises `BrokerUnavailable` for backend trouble.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

SNAPSHOT_TTL = 1000.0
"""Seconds an org's snapshots outlive its last write (> the longest window)."""


class LatencySnapshots(abc.ABC):
    @abc.abstractmethod
    async def put_many(
        self, node: str, snapshots: Sequence[tuple[str, int, bytes]], oldest_slot: int
    ) -> None:
        """Store `node`'s (org, slot, payload) snapshots, replacing older
        versions; forget the written orgs' snapshots with slot < oldest_slot."""

    @abc.abstractmethod
    async def read(self, org: str, oldest_slot: int) -> list[tuple[int, str, bytes]]:
        """(slot, node, payload) of `org`'s snapshots with slot >= oldest_slot,
        by slot then node."""
