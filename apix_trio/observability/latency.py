"""The LatencyTracker: publish->deliver and publish->ack latency per org, merged across nodes.

Theory of operation
-------------------
Two latencies per org (HTTP_API.md `GET /api/v1/latency`):

- publish->deliver: the event's `ts` to the moment a connection's writer
  hands its frame to the socket (`gateway/connection.py`, on every node
  that delivers it);
- publish->ack: a `publish` op's arrival to its reply (`commands/events.py`).

Values go into log-linear buckets (`bucket_index`, HdrHistogram's layout):
exact to the microsecond below 128 us, then 64 buckets per power of two, so
every bucket is at most 1/64 (1.6%) of its value wide. A `Sketch` is a
sparse map bucket -> count plus the exact count, sum and max; sketches merge
by adding counts, so merging nodes and time slots loses nothing beyond the
bucket width. Quantiles are nearest-rank, reported as the middle of the
bucket holding the rank (clamped to the exact max): within 0.8% of the true
value.

Time is cut into 10 s slots of the wall clock (`SLOT_SECONDS`); each org
keeps a ring of its last `RING_SLOTS` (15 minutes), enough for every
window (60, 300, 900 s). A window covers the slots that overlap it, the
current (partial) one included. Slots that leave the ring are merged into
the org's all-time sketch, which `/metrics` exports.

Across nodes: every `SLOT_SECONDS` the `serve` task writes the slots that
changed since its last round, as compact snapshots, to a `LatencyStore`
(the broker's: a hash per org in Redis, field `<slot>:<node>`, see
`broker/redis/latency.py`). A snapshot is the slot's whole sketch, so a
rewrite is idempotent and a failed round is simply retried. `report(org,
window)` reads the org's snapshots from the store and merges those of
*other* nodes with this node's own live slots: this node's numbers are
always current, another node's are at most one round (~10 s) old.

Prometheus (`/metrics`): `apix_org_publish_deliver_latency_seconds` and
`apix_org_publish_ack_latency_seconds` with an `org` label. Label
cardinality is bounded: the `top_orgs` orgs with the most observations on
this node get their own label, all others are summed under `org="other"`.
When the top set changes, a series of `other` may go down, which Prometheus
reads as a counter reset. The buckets are the node-wide histogram's
(`metrics.LATENCY_BUCKETS_MS`), filled from the sketches (a value within
1.6% of a bound may land in the neighbouring bucket).

Cost on the hot path: one dict lookup, a few integer operations and two dict
increments per observation; no allocation unless a new slot or org starts.
Deliveries arrive pre-counted (`gateway/tally.py`): one observation with a
weight per (org, event) per flush, not one per connection.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import orjson
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from apix_trio.observability.logs import get_logger
from apix_trio.observability.metrics import LATENCY_BUCKETS_MS

log = get_logger("apix.latency")

SLOT_SECONDS = 10
SLOT_MS = SLOT_SECONDS * 1000
WINDOWS = (60, 300, 900)
RING_SLOTS = max(WINDOWS) // SLOT_SECONDS
TOP_ORGS = 20
"""Orgs with their own `org` label in the Prometheus histograms."""
QUANTILES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))
_LINEAR_LIMIT = 128  # microseconds below which buckets are exact
_SUB_BITS = 6  # 64 buckets per power of two


def bucket_index(value_ms: float) -> int:
    """The log-linear bucket of a latency in milliseconds (negative -> 0)."""
    us = int(value_ms * 1000)
    if us < _LINEAR_LIMIT:
        return us if us > 0 else 0
    shift = us.bit_length() - (_SUB_BITS + 1)
    return (shift << _SUB_BITS) + (us >> shift)


def bucket_range_ms(index: int) -> tuple[float, float]:
    """[low, high) of a bucket, in milliseconds."""
    if index < _LINEAR_LIMIT:
        return index / 1000, (index + 1) / 1000
    shift = (index >> _SUB_BITS) - 1
    mantissa = index - (shift << _SUB_BITS)
    return (mantissa << shift) / 1000, ((mantissa + 1) << shift) / 1000


def bucket_value_ms(index: int) -> float:
    """The value a bucket stands for: its middle."""
    low, high = bucket_range_ms(index)
    return (low + high) / 2


class BadWindow(ValueError):
    """The window is not one of WINDOWS (HTTP 400)."""


class Sketch:
    """Counts per log-linear bucket, with the exact count, sum and max."""

    __slots__ = ("count", "counts", "max", "sum")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.sum = 0.0
        self.max = 0.0

    def add(self, value_ms: float, times: int = 1) -> None:
        """`times` observations of `value_ms`."""
        us = int(value_ms * 1000)
        if us < _LINEAR_LIMIT:
            index = us if us > 0 else 0
        else:
            shift = us.bit_length() - (_SUB_BITS + 1)
            index = (shift << _SUB_BITS) + (us >> shift)
        counts = self.counts
        counts[index] = counts.get(index, 0) + times
        self.count += times
        self.sum += value_ms * times
        if value_ms > self.max:
            self.max = value_ms

    def merge(self, other: Sketch) -> None:
        counts = self.counts
        for index, count in other.counts.items():
            counts[index] = counts.get(index, 0) + count
        self.count += other.count
        self.sum += other.sum
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float:
        """Nearest-rank quantile: the middle of the bucket holding rank
        ceil(q * count), at most the exact max; 0.0 when empty."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return min(bucket_value_ms(index), self.max)
        return self.max

    def summary(self) -> dict[str, float | int]:
        """`{"p50", "p95", "p99", "max", "count"}` in milliseconds (3 decimals)."""
        out: dict[str, float | int] = {name: round(self.quantile(q), 3) for name, q in QUANTILES}
        out["max"] = round(self.max, 3)
        out["count"] = self.count
        return out

    def to_wire(self) -> dict[str, Any]:
        flat: list[int] = []
        for index, count in self.counts.items():
            flat += (index, count)
        return {"c": flat, "n": self.count, "s": self.sum, "m": self.max}

    @classmethod
    def from_wire(cls, raw: Any) -> Sketch:
        """A sketch from `to_wire`'s form. Raises ValueError/TypeError/KeyError
        when malformed."""
        sketch = cls()
        flat = raw["c"]
        for index, count in zip(flat[::2], flat[1::2], strict=True):
            sketch.counts[int(index)] = sketch.counts.get(int(index), 0) + int(count)
        sketch.count = int(raw["n"])
        sketch.sum = float(raw["s"])
        sketch.max = float(raw["m"])
        return sketch


class _Slot:
    __slots__ = ("ack", "changed", "deliver", "number")

    def __init__(self, number: int) -> None:
        self.number = number
        self.deliver = Sketch()
        self.ack = Sketch()
        self.changed = False

    def payload(self) -> bytes:
        return orjson.dumps({"d": self.deliver.to_wire(), "a": self.ack.to_wire()})


def decode_payload(payload: bytes | str) -> tuple[Sketch, Sketch]:
    """(deliver, ack) sketches of a stored snapshot. Raises ValueError when malformed."""
    try:
        raw = orjson.loads(payload)
        return Sketch.from_wire(raw["d"]), Sketch.from_wire(raw["a"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed latency snapshot: {exc!r}") from None


class OrgLatency:
    """One org's ring of slots and its all-time sketches."""

    __slots__ = ("ack_total", "current", "deliver_total", "slots")

    def __init__(self, slot: int) -> None:
        self.current = _Slot(slot)
        self.slots: dict[int, _Slot] = {slot: self.current}
        self.deliver_total = Sketch()
        self.ack_total = Sketch()

    def slot_at(self, now_ms: float) -> _Slot:
        number = int(now_ms // SLOT_MS)
        current = self.current
        if number > current.number:
            current = self.current = _Slot(number)
            self.slots[number] = current
            self.prune(number)
        current.changed = True
        return current

    def prune(self, current: int) -> None:
        """Merge the slots that left the ring into the all-time sketches."""
        for number in [n for n in self.slots if n <= current - RING_SLOTS]:
            old = self.slots.pop(number)
            self.deliver_total.merge(old.deliver)
            self.ack_total.merge(old.ack)

    def totals(self) -> tuple[Sketch, Sketch]:
        """All-time (deliver, ack) sketches: the pruned ones plus the ring."""
        deliver, ack = Sketch(), Sketch()
        deliver.merge(self.deliver_total)
        ack.merge(self.ack_total)
        for slot in self.slots.values():
            deliver.merge(slot.deliver)
            ack.merge(slot.ack)
        return deliver, ack


class LatencyStore(Protocol):
    """Where nodes share their snapshots (the broker's `latency`)."""

    async def put_many(
        self, node: str, snapshots: Sequence[tuple[str, int, bytes]], oldest_slot: int
    ) -> None:
        """Store (org, slot, payload) snapshots of `node`; forget slots < oldest_slot."""
        ...

    async def read(self, org: str, oldest_slot: int) -> list[tuple[int, str, bytes]]:
        """(slot, node, payload) of every snapshot of `org` with slot >= oldest_slot."""
        ...


class LatencyTracker:
    """Per-org latency of this node, shared through `store` (see the module docstring)."""

    def __init__(
        self,
        node: str,
        *,
        wall_clock: Callable[[], float],
        store: LatencyStore | None = None,
        registry: CollectorRegistry | None = None,
        top_orgs: int = TOP_ORGS,
    ) -> None:
        self.node = node
        self._wall_clock = wall_clock
        self.store = store
        self._orgs: dict[str, OrgLatency] = {}
        self._top_orgs = top_orgs
        if registry is not None:
            registry.register(_OrgHistograms(self, "deliver"))
            registry.register(_OrgHistograms(self, "ack"))

    # -- observing (hot path: synchronous, never awaits) ---------------------------

    def delivered(
        self, org: str, event_ts: float, now_ms: float | None = None, times: int = 1
    ) -> None:
        """`times` frames of an event of `org` stamped `event_ts` (ms) went to
        sockets at `now_ms`."""
        if now_ms is None:
            now_ms = self._wall_clock() * 1000
        self._org(org, now_ms).slot_at(now_ms).deliver.add(now_ms - event_ts, times)

    def acked(self, org: str, latency_ms: float, now_ms: float | None = None) -> None:
        """A publish of `org` was answered `latency_ms` after it arrived."""
        if now_ms is None:
            now_ms = self._wall_clock() * 1000
        self._org(org, now_ms).slot_at(now_ms).ack.add(latency_ms)

    def _org(self, org: str, now_ms: float) -> OrgLatency:
        state = self._orgs.get(org)
        if state is None:
            state = self._orgs[org] = OrgLatency(int(now_ms // SLOT_MS))
        return state

    # -- reading ---------------------------------------------------------------

    def current_slot(self) -> int:
        return int(self._wall_clock() * 1000 // SLOT_MS)

    def local(self, org: str, oldest_slot: int) -> tuple[Sketch, Sketch]:
        """This node's (deliver, ack) sketches of `org` over slots >= oldest_slot."""
        deliver, ack = Sketch(), Sketch()
        state = self._orgs.get(org)
        if state is not None:
            for number, slot in state.slots.items():
                if number >= oldest_slot:
                    deliver.merge(slot.deliver)
                    ack.merge(slot.ack)
        return deliver, ack

    async def report(self, org: str, window: int | str) -> dict[str, Any]:
        """The body of `GET /api/v1/latency?window=...` for `org`, across nodes.

        Error handling: BadWindow (a ValueError) unless `window` is 60, 300 or
        900; the store's errors (BrokerUnavailable) propagate.
        """
        try:
            seconds = int(window)
        except (TypeError, ValueError):
            seconds = -1
        if seconds not in WINDOWS:
            raise BadWindow("window: expected 60, 300 or 900 (seconds)")
        oldest = self.current_slot() - seconds // SLOT_SECONDS + 1
        deliver, ack = self.local(org, oldest)
        if self.store is not None:
            for _slot, node, payload in await self.store.read(org, oldest):
                if node == self.node:
                    continue  # our own live slots are newer than our snapshots
                try:
                    remote_deliver, remote_ack = decode_payload(payload)
                except ValueError as exc:
                    log.warning("latency_snapshot_bad", org=org, node=node, error=str(exc))
                    continue
                deliver.merge(remote_deliver)
                ack.merge(remote_ack)
        return {"publish_to_deliver_ms": deliver.summary(), "publish_ack_ms": ack.summary()}

    # -- sharing -----------------------------------------------------------------

    def take_snapshots(self) -> list[tuple[str, int, bytes]]:
        """(org, slot, payload) of every slot changed since the last call;
        also prunes the rings (idle orgs included)."""
        current = self.current_slot()
        out: list[tuple[str, int, bytes]] = []
        for org, state in self._orgs.items():
            state.prune(current)
            for slot in state.slots.values():
                if slot.changed:
                    slot.changed = False
                    out.append((org, slot.number, slot.payload()))
        return out

    def _mark_changed(self, snapshots: Sequence[tuple[str, int, bytes]]) -> None:
        for org, number, _ in snapshots:
            state = self._orgs.get(org)
            slot = state.slots.get(number) if state is not None else None
            if slot is not None:
                slot.changed = True

    async def publish(self) -> int:
        """Write the changed slots to the store now; how many were written.

        Error handling: on a store failure the slots stay marked changed (the
        next round writes them) and the error propagates.
        """
        snapshots = self.take_snapshots()
        if not snapshots or self.store is None:
            return 0
        try:
            await self.store.put_many(self.node, snapshots, self.current_slot() - RING_SLOTS)
        except BaseException:
            self._mark_changed(snapshots)
            raise
        return len(snapshots)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish snapshots every SLOT_SECONDS until cancelled; never raises
        for store trouble (logged once per outage)."""
        task_status.started()
        failing = False
        while True:
            await trio.sleep(SLOT_SECONDS)
            try:
                await self.publish()
            except Exception as exc:
                if not failing:
                    log.warning("latency_publish_failed", error=str(exc))
                failing = True
            else:
                failing = False

    # -- Prometheus ----------------------------------------------------------------

    def labelled_totals(self, kind: str) -> list[tuple[str, Sketch]]:
        """(org label, all-time sketch) for the top orgs and `other`."""
        totals = []
        for org, state in self._orgs.items():
            deliver, ack = state.totals()
            totals.append((org, deliver if kind == "deliver" else ack))
        totals.sort(key=lambda item: item[1].count, reverse=True)
        top = [item for item in totals[: self._top_orgs] if item[1].count]
        other = Sketch()
        for _, sketch in totals[self._top_orgs :]:
            other.merge(sketch)
        if other.count:
            top.append(("other", other))
        return top


class _OrgHistograms(Collector):
    _NAMES = {
        "deliver": (
            "apix_org_publish_deliver_latency_seconds",
            "Event ts to the socket write that delivered it, per org (top orgs, rest 'other')",
        ),
        "ack": (
            "apix_org_publish_ack_latency_seconds",
            "Publish arrival to its reply, per org (top orgs, rest 'other')",
        ),
    }

    def __init__(self, tracker: LatencyTracker, kind: str) -> None:
        self._tracker = tracker
        self._kind = kind

    def collect(self) -> Iterator[HistogramMetricFamily]:
        name, doc = self._NAMES[self._kind]
        family = HistogramMetricFamily(name, doc, labels=["org"])
        bounds = LATENCY_BUCKETS_MS
        for org, sketch in self._tracker.labelled_totals(self._kind):
            counts = [0] * (len(bounds) + 1)
            for index, count in sketch.counts.items():
                counts[bisect.bisect_left(bounds, bucket_value_ms(index))] += count
            buckets = []
            running = 0
            for bound, count in zip(bounds, counts, strict=False):
                running += count
                buckets.append((str(bound / 1000), running))
            buckets.append(("+Inf", sketch.count))
            family.add_metric([org], buckets, sketch.sum / 1000)
        yield family
