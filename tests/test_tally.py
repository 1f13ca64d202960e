"""Delivery accounting in bulk (apix_trio/gateway/tally.py).

- a weighted observation equals the same observation repeated, in the node
  histogram and in an org's sketch;
- the tally turns (org, event) counts into one observation each, as of the
  commit's clock, and counts every frame in `apix_events_delivered`;
- end to end: one event fanned out to several subscribers is counted once
  per subscriber, in the counter, the node histogram and the org's report.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apix_trio.gateway.reports import latency_report
from apix_trio.gateway.tally import DeliveryTally
from apix_trio.observability.latency import LatencyTracker, Sketch
from apix_trio.observability.metrics import LatencyHistogram, Metrics
from tests.brokers import FakeWallClock
from tests.serverkit import running_server
from tests.wsclient import RawClient

pytestmark = pytest.mark.timeout(60)


@given(
    st.floats(min_value=0, max_value=60_000, allow_nan=False),
    st.integers(min_value=1, max_value=50),
)
def test_a_weighted_observation_equals_repeated_ones(value: float, times: int) -> None:
    weighted, repeated = LatencyHistogram(), LatencyHistogram()
    weighted.observe(value, times)
    for _ in range(times):
        repeated.observe(value)
    assert weighted.counts == repeated.counts
    assert weighted.count == repeated.count == times
    assert weighted.total == pytest.approx(repeated.total)

    one, many = Sketch(), Sketch()
    one.add(value, times)
    for _ in range(times):
        many.add(value)
    assert one.counts == many.counts
    assert (one.count, one.max) == (many.count, many.max)
    assert one.sum == pytest.approx(many.sum)


def test_commit_observes_each_key_once_with_its_weight_as_of_the_commit() -> None:
    clock = FakeWallClock()
    metrics = Metrics()
    tracker = LatencyTracker("n1", wall_clock=clock)
    tally = DeliveryTally(metrics, tracker, clock)
    now_ms = clock() * 1000
    tally.counts[("acme", now_ms - 3)] = 4
    tally.counts[("acme", now_ms - 30)] = 1
    tally.counts[("globex", now_ms - 3)] = 2
    clock.advance(0.002)  # the commit's clock, not the count's, dates the delivery
    tally.commit()

    assert tally.counts == {}
    assert metrics.delivered._value.get() == 7
    histogram = metrics.latency
    assert histogram.count == 7
    assert histogram.total == pytest.approx(4 * 5 + 30 + 2 + 2 * 5)
    acme = tracker._orgs["acme"].current.deliver
    assert acme.count == 5
    assert acme.max == pytest.approx(32)
    assert tracker._orgs["globex"].current.deliver.count == 2

    tally.commit()  # nothing new: nothing observed twice
    assert histogram.count == 7
    assert metrics.delivered._value.get() == 7


async def test_a_fanned_out_event_is_counted_once_per_subscriber(tmp_path) -> None:
    async with running_server(tmp_path) as kit:
        subscribers = [await RawClient.open(kit.url) for _ in range(3)]
        publisher = await RawClient.open(kit.url)
        try:
            for index, client in enumerate(subscribers):
                assert (await client.call("auth", token=kit.token(sub=f"s{index}")))["ok"]
                assert (await client.call("subscribe", channel="chat.fan"))["ok"]
            assert (await publisher.call("auth", token=kit.token(sub="p")))["ok"]
            for n in range(4):
                assert (await publisher.call("publish", channel="chat.fan", data=n))["ok"]
            for client in subscribers:
                for n in range(4):
                    assert (await client.next_push())["event"]["data"] == n
            hub = kit.hub
            # Every flush commits, and the pushes above were read off the socket.
            assert hub.tally.counts == {}
            assert hub.metrics.delivered._value.get() == 12
            assert hub.metrics.latency.count == 12
            report = await latency_report(hub, "acme", "300")
            assert report["publish_to_deliver_ms"]["count"] == 12
        finally:
            for client in [*subscribers, publisher]:
                await client.close()
