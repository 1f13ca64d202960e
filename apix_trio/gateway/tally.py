"""Delivery accounting in bulk: one latency observation per (org, event) per flush.

A fan-out writes the same event to many connections in one coalescer flush
(`gateway/coalesce.py`). Observing its publish->deliver latency once per
connection cost a histogram bisect, a sketch update and a counter increment
per frame, the largest per-delivery cost left after the writes themselves.
Connections instead count what they wrote here, keyed by (org, event ts);
`commit` turns each key into one weighted observation in the node histogram
(`metrics.latency`) and the org's sketch (`LatencyTracker.delivered`), and
adds the total to `apix_events_delivered`.

Promises: every event frame that reached a socket is counted exactly once
(no frame is counted before its write, none is lost between commits: the
coalescer commits after every flush and a writer task after every write).
The delivery time is the wall clock at the commit, which is at most one
flush after the write: the reported latency is an upper bound, never an
underestimate.
"""

from __future__ import annotations

from collections.abc import Callable

from apix_trio.observability.latency import LatencyTracker
from apix_trio.observability.metrics import Metrics


class DeliveryTally:
    """See the module docstring. One per node (`Hub.tally`)."""

    __slots__ = ("_latency", "_metrics", "_wall_clock", "counts")

    def __init__(
        self, metrics: Metrics, latency: LatencyTracker, wall_clock: Callable[[], float]
    ) -> None:
        self._metrics = metrics
        self._latency = latency
        self._wall_clock = wall_clock
        self.counts: dict[tuple[str, float], int] = {}
        """(org, event ts in ms) -> frames written since the last commit."""

    def commit(self) -> None:
        """Observe everything counted since the last commit, as of now."""
        counts = self.counts
        if not counts:
            return
        self.counts = {}
        now_ms = self._wall_clock() * 1000
        histogram = self._metrics.latency
        delivered = self._latency.delivered
        total = 0
        for (org, event_ts), times in counts.items():
            histogram.observe(now_ms - event_ts, times)
            delivered(org, event_ts, now_ms, times)
            total += times
        self._metrics.delivered.inc(total)
