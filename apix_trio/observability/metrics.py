"""Server metrics: Prometheus counters and gauges, plus a cheap latency histogram.

The publish->deliver histogram is observed on the hot path (once per distinct
latency per flush, `gateway/tally.py`), so it is a plain bucket array (bisect
+ one increment) exported
through a custom collector instead of a prometheus_client Histogram with its
per-observation locking.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class LatencyHistogram:
    """Milliseconds histogram with fixed buckets; `quantile` for reports."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_MS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value_ms: float, times: int = 1) -> None:
        """`times` observations of `value_ms` (one bisect however many)."""
        self.counts[bisect.bisect_left(self.bounds, value_ms)] += times
        self.total += value_ms * times
        self.count += times

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile `q` (inf past the last)."""
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return float(self.bounds[index]) if index < len(self.bounds) else float("inf")
        return float("inf")


class _HistogramCollector(Collector):
    def __init__(self, name: str, doc: str, histogram: LatencyHistogram) -> None:
        self._name = name
        self._doc = doc
        self._histogram = histogram

    def collect(self) -> Iterator[HistogramMetricFamily]:
        h = self._histogram
        buckets = []
        running = 0
        for bound, count in zip(h.bounds, h.counts, strict=False):
            running += count
            buckets.append((str(bound / 1000), running))
        buckets.append(("+Inf", h.count))
        family = HistogramMetricFamily(self._name, self._doc)
        family.add_metric([], buckets, h.total / 1000)
        yield family


class Metrics:
    """Every metric of one server, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge("apix_connections", "Open WebSocket connections", registry=r)
        self.connections_total = Counter(
            "apix_connections_accepted", "WebSocket connections accepted", registry=r
        )
        self.closes = Counter(
            "apix_connection_closes", "Connections closed, by close code", ["code"], registry=r
        )
        self._closes_by_code: dict[int, Any] = {}
        self.auth_failures = Counter(
            "apix_auth_failures", "Failed authentications, by reason", ["reason"], registry=r
        )
        self.handshake_rejections = Counter(
            "apix_handshake_rejections",
            "Upgrades rejected, by HTTP status",
            ["status"],
            registry=r,
        )
        self.published = Counter("apix_events_published", "Events stored", registry=r)
        self.duplicates = Counter(
            "apix_publish_duplicates", "Publishes answered from the idempotency key", registry=r
        )
        self.delivered = Counter(
            "apix_events_delivered", "Event frames written to sockets", registry=r
        )
        self.slow_consumers = Counter(
            "apix_slow_consumers", "Connections closed for a full outbox (4009)", registry=r
        )
        self.rate_limited = Counter("apix_rate_limited", "Ops answered rate_limited", registry=r)
        self.bad_frames = Counter("apix_bad_frames", "Frames answered bad_request", registry=r)
        self.broker_unavailable = Counter(
            "apix_broker_unavailable", "Ops answered unavailable", registry=r
        )
        self.subscriptions = Gauge("apix_subscriptions", "Live channel subscriptions", registry=r)
        self.state_changes = Counter(
            "apix_state_changes", "State changes (set, patch, delete) made by this node", registry=r
        )
        self.state_subscribers = Gauge(
            "apix_state_subscribers", "Live state subscriptions (connection, key)", registry=r
        )
        self.group_readers = Gauge(
            "apix_group_readers", "Consumer-group readers (channel, group) on this node", registry=r
        )
        self.group_members = Gauge(
            "apix_group_members", "Consumer-group members on this node", registry=r
        )
        self.group_pending = Gauge(
            "apix_group_pending",
            "Group events delivered to this node's members and not acked yet",
            registry=r,
        )
        self.group_deliveries = Counter(
            "apix_group_deliveries", "Group event pushes (first deliveries and retries)", registry=r
        )
        self.group_redeliveries = Counter(
            "apix_group_redeliveries", "Group event pushes with attempt > 1", registry=r
        )
        self.group_acks = Counter("apix_group_acks", "Group events acknowledged", registry=r)
        self.group_dead_letters = Counter(
            "apix_group_dead_letters", "Group events moved to <channel>.dlq", registry=r
        )
        self.presence_members = Gauge(
            "apix_presence_members",
            "Presence memberships (connection, channel) held by this node",
            registry=r,
        )
        self.presence_joins = Counter(
            "apix_presence_joins", "Presence joins this node wrote", registry=r
        )
        self.presence_leaves = Counter(
            "apix_presence_leaves",
            "Presence leaves this node wrote (its own members' and reaped ones)",
            registry=r,
        )
        self.latency = LatencyHistogram()
        r.register(
            _HistogramCollector(
                "apix_publish_deliver_latency_seconds",
                "Event ts to the socket write that delivered it",
                self.latency,
            )
        )

    def count_close(self, code: int) -> None:
        """`closes` for `code`, with the labelled child kept (a `labels()`
        lookup on every close costs more than the increment)."""
        child = self._closes_by_code.get(code)
        if child is None:
            child = self._closes_by_code[code] = self.closes.labels(code=str(code))
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
