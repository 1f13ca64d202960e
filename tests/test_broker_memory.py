"""What only the embedded broker promises, beyond the contract suite: exact
trimming and expiry instants, ids under a clock that goes back, the tombstone,
reclaimed memory, atomic cancellation and large-history reads.

Every test drives the broker's wall clock by hand (`FakeWallClock`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import attrs
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from apix_trio.broker.memory.events import MemoryBroker, open_memory_broker
from apix_trio.broker.model import TOMBSTONE_GRACE, Retention
from apix_trio.protocol.event import Event
from apix_trio.protocol.ids import BadStreamId, StreamId, format_id, parse_id
from tests.brokers import T0, FakeWallClock

T0_MS = int(T0 * 1000)
LONG = Retention(history_size=1000, history_ttl=3600.0, dedupe_window=600.0)


@attrs.define
class Harness:
    broker: MemoryBroker
    clock: FakeWallClock
    received: list[tuple[str, str, Event]]

    async def publish(
        self, channel: str = "c", retention: Retention = LONG, key: str | None = None
    ) -> Event:
        result = await self.broker.publish(
            "org", channel, "{}", sender="s", key=key, retention=retention
        )
        assert not result.duplicate
        return result.event

    async def retained(self, channel: str = "c") -> list[str]:
        page = await self.broker.read_after("org", channel, "0", 10**6, LONG)
        return [event.id for event in page.events]

    async def recovered(self, since: str, channel: str = "c") -> bool:
        return (await self.broker.read_after("org", channel, since, 10, LONG)).recovered


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    clock = FakeWallClock()
    received: list[tuple[str, str, Event]] = []
    async with open_memory_broker(wall_clock=clock) as broker:
        broker.set_listener(lambda org, channel, event: received.append((org, channel, event)))
        yield Harness(broker, clock, received)


async def test_ids_keep_increasing_when_the_clock_goes_back(harness: Harness) -> None:
    ids = [(await harness.publish()).id]
    for step in (-10.0, 5.0, -3600.0):
        harness.clock.advance(step)
        ids.append((await harness.publish()).id)
    harness.clock.advance(3600.0 + 8.0)
    ids.append((await harness.publish()).id)
    assert ids == [
        f"{T0_MS}-0",
        f"{T0_MS}-1",
        f"{T0_MS}-2",
        f"{T0_MS}-3",
        f"{T0_MS + 3000}-0",
    ]


async def test_ts_is_the_ids_milliseconds(harness: Harness) -> None:
    first = await harness.publish()
    harness.clock.advance(-1.0)
    second = await harness.publish()
    assert (first.ts, second.ts) == (T0_MS, T0_MS)
    assert second.id == f"{T0_MS}-1"


async def test_the_tombstone_keeps_ids_increasing_after_expiry(harness: Harness) -> None:
    ttl = Retention(history_size=10, history_ttl=10.0, dedupe_window=600.0)
    harness.clock.advance(100.0)  # ahead: ids now carry T0 + 100 s
    ahead = await harness.publish(retention=ttl)
    harness.clock.advance(-100.0)  # back to T0: this publish expires at T0 + 10
    last = await harness.publish(retention=ttl)
    assert last.id == f"{T0_MS + 100_000}-1"

    harness.clock.advance(11.0)  # history gone, wall clock still behind the ids
    assert await harness.retained() == []
    assert await harness.broker.position("org", "c") == last.id
    assert await harness.recovered(last.id)
    assert not await harness.recovered(ahead.id)
    after = await harness.publish(retention=ttl)
    assert after.id == f"{T0_MS + 100_000}-2"


async def test_the_tombstone_is_forgotten_after_its_grace(harness: Harness) -> None:
    ttl = Retention(history_size=10, history_ttl=10.0, dedupe_window=600.0)
    last = await harness.publish(retention=ttl)
    harness.clock.advance(10.0 + TOMBSTONE_GRACE - 0.001)
    assert await harness.broker.position("org", "c") == last.id
    assert await harness.recovered(last.id)
    harness.clock.advance(0.001)
    assert await harness.broker.position("org", "c") == "0-0"
    assert harness.broker.statistics().channels == 0
    assert not await harness.recovered(last.id)  # nothing is known any more
    assert await harness.recovered("0")


async def test_history_expires_exactly_ttl_after_the_last_publish(harness: Harness) -> None:
    ttl = Retention(history_size=10, history_ttl=10.0, dedupe_window=600.0)
    first = await harness.publish(retention=ttl)
    harness.clock.advance(6.0)
    second = await harness.publish(retention=ttl)  # pushes expiry to T0 + 16
    harness.clock.advance(9.999)
    assert await harness.retained() == [first.id, second.id]
    harness.clock.advance(0.001)
    assert await harness.retained() == []
    assert await harness.recovered(second.id)
    assert not await harness.recovered(first.id)
    assert not await harness.recovered("0")


async def test_trimming_keeps_exactly_history_size(harness: Harness) -> None:
    three = Retention(history_size=3, history_ttl=3600.0, dedupe_window=600.0)
    ids = [(await harness.publish(retention=three)).id for _ in range(10)]
    assert await harness.retained() == ids[-3:]
    assert [await harness.recovered(i) for i in ids] == [False] * 6 + [True] * 4

    none = Retention(history_size=0, history_ttl=3600.0, dedupe_window=600.0)
    zero = [(await harness.publish("z", none)).id for _ in range(200)]
    assert await harness.retained("z") == []
    assert await harness.broker.position("org", "z") == zero[-1]
    assert await harness.recovered(zero[-1], "z")
    assert not await harness.recovered(zero[-2], "z")
    assert len(harness.received) == 210


async def test_the_dedupe_window_is_exact_and_not_extended(harness: Harness) -> None:
    window = Retention(history_size=10, history_ttl=3600.0, dedupe_window=10.0)
    publish = harness.broker.publish
    first = await publish("org", "c", "1", sender="a", key="k", retention=window)
    harness.clock.advance(9.999)
    again = await publish("org", "c", "2", sender="b", key="k", retention=window)
    assert again == attrs.evolve(first, duplicate=True)  # the very same event
    harness.clock.advance(0.001)
    third = await publish("org", "c", "3", sender="a", key="k", retention=window)
    assert not third.duplicate
    assert third.event.data == "3"


async def test_the_listener_has_the_event_before_publish_returns(harness: Harness) -> None:
    seen: list[list[tuple[str, str, Event]]] = []
    harness.broker.set_listener(lambda o, c, e: seen.append([(o, c, e)]))
    event = await harness.publish("x")
    assert seen == [[("org", "x", event)]]


async def test_a_cancelled_publish_stores_nothing(harness: Harness) -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        await harness.publish(key="k")
    assert scope.cancelled_caught
    assert await harness.broker.position("org", "c") == "0-0"
    assert harness.received == []
    assert harness.broker.statistics().dedupe_keys == 0


async def test_a_malformed_since_is_rejected(harness: Harness) -> None:
    for since in ("", "1", "1-", "-1-0", "01-0", "abc"):
        with pytest.raises(BadStreamId):
            await harness.broker.read_after("org", "c", since, 10, LONG)


# -- memory --------------------------------------------------------------------


async def test_expired_channels_and_keys_are_reclaimed(harness: Harness) -> None:
    short = Retention(history_size=10, history_ttl=60.0, dedupe_window=30.0)
    for n in range(1000):
        await harness.publish(f"idle.{n}", short, key="k")
    stats = harness.broker.statistics()
    assert (stats.channels, stats.retained_events, stats.dedupe_keys) == (1000, 1000, 1000)

    harness.clock.advance(61.0)
    for _ in range(40):  # other traffic sweeps the idle channels
        await harness.broker.position("org", "busy")
    stats = harness.broker.statistics()
    assert (stats.channels, stats.retained_events, stats.dedupe_keys) == (1000, 0, 0)

    harness.clock.advance(TOMBSTONE_GRACE)
    for _ in range(40):
        await harness.publish("busy", short)
    stats = harness.broker.statistics()
    assert (stats.channels, stats.retained_events, stats.dedupe_keys) == (1, 10, 0)
    assert stats.scheduled_expiries <= 32


async def test_a_channel_used_again_after_expiry_is_swept_on_time(harness: Harness) -> None:
    short = Retention(history_size=10, history_ttl=60.0, dedupe_window=30.0)
    nothing = Retention(history_size=0, history_ttl=60.0, dedupe_window=30.0)
    await harness.publish("again", short)
    harness.clock.advance(61.0)
    await harness.publish("busy", nothing)  # sweeps: "again" is now a tombstone
    await harness.publish("again", short)  # retains an event again, due at +60 s
    harness.clock.advance(61.0)
    await harness.publish("busy", nothing)  # must not wait for the tombstone's grace
    assert harness.broker.statistics().retained_events == 0


async def test_a_hot_channel_and_a_stream_of_keys_stay_bounded(harness: Harness) -> None:
    window = Retention(history_size=100, history_ttl=3600.0, dedupe_window=1.0)
    for n in range(10_000):
        await harness.publish(key=f"k{n}", retention=window)
        harness.clock.advance(0.01)  # so about 100 keys are in the window
    stats = harness.broker.statistics()
    assert stats.retained_events == 100
    assert stats.dedupe_keys <= 101
    assert stats.scheduled_expiries <= 1 + 101 + 32


async def test_a_large_history_pages_correctly_and_fast(harness: Harness) -> None:
    big = Retention(history_size=100_000, history_ttl=3600.0, dedupe_window=600.0)
    published = []
    for n in range(100_000):
        published.append((await harness.publish(retention=big)).id)
        if n % 37 == 0:
            harness.clock.advance(0.001)

    started = time.perf_counter()
    collected: list[str] = []
    since = "0"
    while page := (await harness.broker.read_after("org", "c", since, 100, big)).events:
        collected += [event.id for event in page]
        since = page[-1].id
    middle = await harness.broker.read_after("org", "c", published[54_321], 10, big)
    elapsed = time.perf_counter() - started

    assert collected == published
    assert [event.id for event in middle.events] == published[54_322:54_332]
    assert middle.recovered
    latest = await harness.broker.read_latest("org", "c", 5, big)
    assert [event.id for event in latest.events] == published[-5:]
    # 1000 pages: a read that scans the history instead of bisecting it takes
    # seconds here; bisecting takes milliseconds.
    assert elapsed < 2.0


# -- model check ---------------------------------------------------------------


def model_recovered(stored: list[StreamId], retained: list[StreamId], since: StreamId) -> bool:
    """The definition in broker/events.py, read literally: `since` is "0-0" or an id
    of the channel, and every id after it is still retained."""
    is_an_id = since == (0, 0) or since in stored
    return is_an_id and all(i in retained for i in stored if i > since)


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(st.tuples(st.integers(-50, 50), st.integers(0, 6), st.booleans()), max_size=40),
    limit=st.integers(1, 8),
)
async def test_reads_agree_with_the_model(steps: list[tuple[int, int, bool]], limit: int) -> None:
    clock = FakeWallClock()
    async with open_memory_broker(wall_clock=clock) as broker:
        stored: list[StreamId] = []
        kept: int = 0
        for move_ms, history_size, publish in steps:
            clock.advance(move_ms / 1000)
            if publish:
                retention = Retention(history_size=history_size)
                result = await broker.publish(
                    "o", "c", "0", sender="s", key=None, retention=retention
                )
                stored.append(parse_id(result.event.id))
                kept = min(kept + 1, history_size)
        assert stored == sorted(set(stored))
        retained = stored[len(stored) - kept :]
        candidates = {(0, 0), (1, 0)} | set(stored)
        candidates |= {(ms, seq + 1) for ms, seq in stored} | {(ms - 1, seq) for ms, seq in stored}
        for since in sorted(candidates):
            page = await broker.read_after("o", "c", format_id(since), limit, LONG)
            expected = [i for i in retained if i > since][:limit]
            assert [parse_id(event.id) for event in page.events] == expected
            assert page.recovered == model_recovered(stored, retained, since), since
            assert page.position == format_id(stored[-1] if stored else (0, 0))
