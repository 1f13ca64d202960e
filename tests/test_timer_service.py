"""The node-level timer service (gateway/timers.py) on a MockClock, exact times."""

from __future__ import annotations

import gc
import weakref

import pytest
import trio
import trio.testing

from apix_trio.gateway.timers import TimerService


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_entries_fire_at_their_exact_times_in_order(autojump_clock):
    timers = TimerService()
    fired: list[tuple[str, float]] = []

    def note(name: str):
        return lambda: fired.append((name, trio.current_time()))

    async with trio.open_nursery() as nursery:
        await nursery.start(timers.serve)
        start = trio.current_time()
        timers.call_later(3.0, note("c"))
        timers.call_later(1.0, note("a"))
        timers.call_later(2.0, note("b"))
        timers.call_later(2.0, note("b2"))  # same deadline: the order they were added
        assert len(timers) == 4
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert fired == [
        ("a", start + 1.0),
        ("b", start + 2.0),
        ("b2", start + 2.0),
        ("c", start + 3.0),
    ]
    assert len(timers) == 0


async def test_an_earlier_entry_wakes_the_sleeping_service(autojump_clock):
    timers = TimerService()
    fired: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(timers.serve)
        start = trio.current_time()
        timers.call_later(100.0, lambda: fired.append(trio.current_time()))
        await trio.sleep(5.0)  # the service now sleeps until start + 100
        timers.call_later(1.0, lambda: fired.append(trio.current_time()))
        await trio.sleep(200)
        nursery.cancel_scope.cancel()
    assert fired == [start + 6.0, start + 100.0]


async def test_cancelled_entries_never_fire_and_hold_nothing(autojump_clock):
    timers = TimerService()
    fired: list[str] = []

    class Owner:
        def callback(self) -> None:
            fired.append("owner")

    owner = Owner()
    alive = weakref.ref(owner)
    async with trio.open_nursery() as nursery:
        await nursery.start(timers.serve)
        entry = timers.call_later(1.0, owner.callback)
        keep = timers.call_later(2.0, lambda: fired.append("keep"))
        entry.cancel()
        entry.cancel()  # idempotent
        assert len(timers) == 1 and not entry.active and keep.active
        del owner
        gc.collect()
        assert alive() is None  # the cancelled entry dropped its callback at once
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert fired == ["keep"]
    assert not keep.active  # fired entries are spent


async def test_a_callback_may_reschedule_and_a_failing_one_is_survived(autojump_clock):
    timers = TimerService()
    ticks: list[float] = []

    def tick() -> None:
        ticks.append(trio.current_time())
        if len(ticks) < 3:
            timers.call_later(2.5, tick)

    def boom() -> None:
        raise RuntimeError("callback bug")

    async with trio.open_nursery() as nursery:
        await nursery.start(timers.serve)
        start = trio.current_time()
        timers.call_later(0.5, boom)
        timers.call_later(1.0, tick)
        await trio.sleep(20)
        nursery.cancel_scope.cancel()
    assert ticks == [start + 1.0, start + 3.5, start + 6.0]
    assert timers.statistics()["fired"] == 4


async def test_the_heap_is_compacted_when_cancelled_entries_pile_up(autojump_clock):
    timers = TimerService()
    entries = [timers.call_later(1000.0 + n, lambda: None) for n in range(1000)]
    for entry in entries[:900]:
        entry.cancel()
    stats = timers.statistics()
    assert stats["live"] == 100
    assert stats["heap"] <= 2 * 100 + 1
    for entry in entries[900:]:
        entry.cancel()
    assert len(timers) == 0
    assert timers.statistics()["heap"] <= 64


async def test_an_entry_due_in_the_past_fires_at_once(autojump_clock):
    timers = TimerService()
    fired: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(timers.serve)
        now = trio.current_time()
        timers.call_at(now - 5.0, lambda: fired.append(trio.current_time()))
        await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    assert fired == [now]
