"""The LatencyTracker (apix_trio/observability/latency.py) and its snapshot stores.

- bucket maths: every value lands in a bucket at most 1/64 of itself wide;
- the snapshot store contract (apix_trio/broker/latency.py) over memory and
  a real Redis;
- two trackers (two nodes) over one store: the report merges both, and the
  quantiles of known inputs come out within the bucket precision;
- windows and slots on a fake wall clock; `/metrics` with the `org` label
  bounded to the top orgs;
- end to end: a real publish over a WebSocket feeds both latencies.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import AsyncIterator

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from apix_trio.broker.latency import LatencySnapshots
from apix_trio.broker.memory.latency import MemoryLatencySnapshots
from apix_trio.gateway.reports import latency_report
from apix_trio.observability.latency import (
    RING_SLOTS,
    SLOT_SECONDS,
    BadWindow,
    LatencyTracker,
    Sketch,
    bucket_index,
    bucket_range_ms,
    decode_payload,
)
from apix_trio.settings import BrokerSettings, Settings
from tests.brokers import FakeWallClock
from tests.serverkit import running_server
from tests.wsclient import RawClient

pytestmark = pytest.mark.timeout(60)

PRECISION = 1 / 64


# -- bucket maths ---------------------------------------------------------------------


@given(st.floats(min_value=0.0, max_value=3_600_000.0))
def test_every_value_lands_in_a_narrow_bucket_that_holds_it(value: float) -> None:
    low, high = bucket_range_ms(bucket_index(value))
    us = int(value * 1000) / 1000
    assert low <= us < high + 1e-9
    assert high - low <= max(0.001, low * PRECISION) + 1e-9


def test_buckets_are_contiguous_and_increasing() -> None:
    previous_high = 0.0
    for index in range(0, 2000):
        low, high = bucket_range_ms(index)
        assert low == pytest.approx(previous_high) and high > low
        previous_high = high
    assert bucket_index(-5) == 0


def test_sketch_quantiles_of_known_inputs() -> None:
    sketch = Sketch()
    for value in range(1, 1001):  # 1..1000 ms
        sketch.add(float(value))
    assert sketch.count == 1000 and sketch.max == 1000.0
    for q, exact in ((0.5, 500), (0.95, 950), (0.99, 990)):
        assert sketch.quantile(q) == pytest.approx(exact, rel=PRECISION)
    empty = Sketch().summary()
    assert empty == {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0, "count": 0}


# -- the snapshot store contract -----------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[LatencySnapshots]:
    if request.param == "memory":
        yield MemoryLatencySnapshots()
        return
    from apix_trio.broker.redis.events import open_redis_broker

    url = request.getfixturevalue("redis_url")
    prefix = f"apixtest-{uuid.uuid4().hex[:12]}"
    settings = Settings(broker=BrokerSettings(redis_url=url, key_prefix=prefix))
    async with open_redis_broker(settings) as broker:
        yield broker.latency


async def test_store_replaces_forgets_old_slots_and_keeps_orgs_apart(
    store: LatencySnapshots,
) -> None:
    await store.put_many(
        "n1", [("acme", 100, b"a"), ("acme", 101, b"b"), ("globex", 100, b"g")], 90
    )
    await store.put_many("n2", [("acme", 101, b"c")], 90)
    await store.put_many("n1", [("acme", 101, b"B")], 90)  # a rewrite replaces
    assert await store.read("acme", 0) == [(100, "n1", b"a"), (101, "n1", b"B"), (101, "n2", b"c")]
    assert await store.read("acme", 101) == [(101, "n1", b"B"), (101, "n2", b"c")]
    assert await store.read("globex", 0) == [(100, "n1", b"g")]
    await store.put_many("n2", [("acme", 200, b"d")], 101)  # forgets slot 100
    assert [slot for slot, _, _ in await store.read("acme", 0)] == [101, 101, 200]
    assert await store.read("initech", 0) == []


# -- two nodes, one store ---------------------------------------------------------------------


async def check_two_nodes_merge(store: LatencySnapshots) -> None:
    clock = FakeWallClock(1_800_000_000.0)
    node_a = LatencyTracker("a", wall_clock=clock, store=store)
    node_b = LatencyTracker("b", wall_clock=clock, store=store)
    rng = random.Random(7)
    values_a = [rng.uniform(1, 50) for _ in range(600)]
    values_b = [rng.uniform(40, 400) for _ in range(400)]
    now_ms = clock() * 1000
    for value in values_a:
        node_a.delivered("acme", now_ms - value, now_ms)
        node_a.acked("acme", value / 10, now_ms)
    for value in values_b:
        node_b.delivered("acme", now_ms - value, now_ms)
    node_b.delivered("globex", now_ms - 1, now_ms)
    assert await node_b.publish() == 2  # acme and globex, one slot each
    report = await node_a.report("acme", 60)
    merged = sorted(values_a + values_b)
    deliver = report["publish_to_deliver_ms"]
    assert deliver["count"] == 1000
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        exact = merged[math.ceil(q * len(merged)) - 1]
        assert deliver[name] == pytest.approx(exact, rel=PRECISION), name
    assert deliver["max"] == pytest.approx(max(merged), abs=0.001)
    ack = report["publish_ack_ms"]
    assert ack["count"] == 600
    assert ack["p50"] == pytest.approx(sorted(values_a)[299] / 10, rel=PRECISION)
    # node b sees a's numbers only once a has published them
    assert (await node_b.report("acme", 60))["publish_to_deliver_ms"]["count"] == 400
    await node_a.publish()
    assert (await node_b.report("acme", 60))["publish_to_deliver_ms"]["count"] == 1000


async def test_two_trackers_over_one_redis_merge(redis_url: str) -> None:
    from apix_trio.broker.redis.events import open_redis_broker

    prefix = f"apixtest-{uuid.uuid4().hex[:12]}"
    settings = Settings(broker=BrokerSettings(redis_url=redis_url, key_prefix=prefix))
    async with open_redis_broker(settings) as broker:
        with trio.fail_after(20):
            await check_two_nodes_merge(broker.latency)


async def test_two_trackers_over_one_memory_store_merge() -> None:
    await check_two_nodes_merge(MemoryLatencySnapshots())


# -- windows, slots, publishing ----------------------------------------------------------------


async def test_windows_cover_their_slots_and_old_slots_leave_the_ring() -> None:
    clock = FakeWallClock(1_800_000_000.0)  # a slot boundary
    tracker = LatencyTracker("a", wall_clock=clock)
    for minute in range(16):  # one observation a minute, 16 minutes
        tracker.delivered("acme", clock() * 1000 - (minute + 1))
        clock.advance(60)
    clock.advance(-60)  # now: within the last minute's slot
    counts = {
        w: (await tracker.report("acme", w))["publish_to_deliver_ms"]["count"]
        for w in (60, 300, 900)
    }
    assert counts == {60: 1, 300: 5, 900: 15}
    with pytest.raises(BadWindow):
        await tracker.report("acme", 120)
    with pytest.raises(BadWindow):
        await tracker.report("acme", "x")
    assert (await latency_report_window_default(tracker))["publish_to_deliver_ms"]["count"] == 1
    # the ring never holds more than RING_SLOTS slots; older ones move to the totals
    tracker.take_snapshots()
    state = tracker._orgs["acme"]
    assert len(state.slots) <= RING_SLOTS
    deliver, _ = state.totals()
    assert deliver.count == 16


async def latency_report_window_default(tracker: LatencyTracker) -> dict:
    return await tracker.report("acme", "60")


async def test_only_changed_slots_are_published_and_failures_retry() -> None:
    clock = FakeWallClock(1_800_000_000.0)
    store = MemoryLatencySnapshots()
    tracker = LatencyTracker("a", wall_clock=clock, store=store)
    tracker.delivered("acme", clock() * 1000 - 5)
    assert await tracker.publish() == 1
    assert await tracker.publish() == 0  # nothing changed
    clock.advance(SLOT_SECONDS)
    tracker.acked("acme", 2.0)

    class Down(MemoryLatencySnapshots):
        async def put_many(self, *args: object, **kw: object) -> None:
            raise RuntimeError("down")

    tracker.store = Down()
    with pytest.raises(RuntimeError):
        await tracker.publish()
    tracker.store = store
    assert await tracker.publish() == 1  # the failed slot is written next time
    [(_, _, first), (_, _, second)] = await store.read("acme", 0)
    assert decode_payload(first)[0].count == 1 and decode_payload(second)[1].count == 1


def test_prometheus_org_label_is_bounded_to_the_top_orgs() -> None:
    clock = FakeWallClock(1_800_000_000.0)
    registry = CollectorRegistry()
    tracker = LatencyTracker("a", wall_clock=clock, registry=registry, top_orgs=2)
    now_ms = clock() * 1000
    for org, n in (("big", 30), ("mid", 20), ("small", 5), ("tiny", 1)):
        for _ in range(n):
            tracker.delivered(org, now_ms - 3, now_ms)
    sample = registry.get_sample_value
    name = "apix_org_publish_deliver_latency_seconds"
    assert sample(f"{name}_count", {"org": "big"}) == 30
    assert sample(f"{name}_count", {"org": "mid"}) == 20
    assert sample(f"{name}_count", {"org": "other"}) == 6
    assert sample(f"{name}_count", {"org": "small"}) is None
    assert sample(f"{name}_bucket", {"org": "big", "le": "0.002"}) == 0
    assert sample(f"{name}_bucket", {"org": "big", "le": "0.005"}) == 30
    assert b"apix_org_publish_ack_latency_seconds" in generate_latest(registry)


# -- end to end --------------------------------------------------------------------------


async def test_a_real_publish_feeds_both_latencies(tmp_path) -> None:
    async with running_server(tmp_path) as kit:
        subscriber = await RawClient.open(kit.url)
        publisher = await RawClient.open(kit.url)
        try:
            assert (await subscriber.call("auth", token=kit.token(sub="s")))["ok"]
            assert (await subscriber.call("subscribe", channel="chat.x"))["ok"]
            assert (await publisher.call("auth", token=kit.token(sub="p")))["ok"]
            for n in range(5):
                assert (await publisher.call("publish", channel="chat.x", data=n))["ok"]
            for _ in range(5):
                await subscriber.next_push()
            report = await latency_report(kit.hub, "acme", "300")
            assert report["publish_ack_ms"]["count"] == 5
            assert report["publish_to_deliver_ms"]["count"] == 5
            assert 0 <= report["publish_ack_ms"]["p50"] < 1000
            assert (await latency_report(kit.hub, "globex"))["publish_ack_ms"]["count"] == 0
        finally:
            await subscriber.close()
            await publisher.close()
