"""Assertions and metric readers shared by the in-process server tests.

- `sample(metrics, name, **labels)`: one Prometheus sample, 0.0 when absent;
- `closes_by_code(metrics)` / `sum_closes(metrics)`: the
  `apix_connection_closes_total` counters per close code, and their sum;
- `assert_hub_idle(hub, others=n)`: nothing is left of the connections that
  ended: only `others` connections (all of org "acme") in the registry and
  the `apix_connections` gauge, no subscription in the router or the
  `apix_subscriptions` gauge.
"""

from __future__ import annotations

from apix_trio.gateway.hub import Hub
from apix_trio.observability.metrics import Metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def closes_by_code(metrics: Metrics) -> dict[str, float]:
    """`apix_connection_closes_total` per close code (one registry scan)."""
    return {
        sample.labels["code"]: sample.value
        for family in metrics.registry.collect()
        if family.name == "apix_connection_closes"
        for sample in family.samples
        if sample.name == "apix_connection_closes_total"
    }


def sum_closes(metrics: Metrics) -> float:
    return sum(closes_by_code(metrics).values())


def assert_hub_idle(hub: Hub, *, others: int = 0) -> None:
    """Only the `others` connections remain (org "acme"), with no subscription."""
    assert len(hub.registry) == others
    assert hub.registry.org_count("acme") == others
    assert hub.router.statistics().subscriptions == 0
    assert sample(hub.metrics, "apix_connections") == others
    assert sample(hub.metrics, "apix_subscriptions") == 0
