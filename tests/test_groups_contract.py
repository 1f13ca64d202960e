"""The consumer-group contract (apix_trio/broker/groups.py), on memory and Redis.

One suite, parametrised by `broker_kind` over "memory", "redis" and
"redis-cluster" (the session's Redis Cluster, tests/brokers.py) (select a
side with `-k memory` / `-k redis`). The Redis side runs against a real
redis-server (tests/conftest.py) with a fresh key prefix per test.

Time. Idle times are what `claim_idle` and `touch` are about. The memory side
runs on a MockClock (autojump), so `trio.sleep(1.0)` is instant and exact;
the Redis side runs on the real clock (redis-py's timeouts need it), so the
few idle tests really wait about a second, each bounded by `fail_after`.
Thresholds are chosen far from the waits (idle >= 0.5 s after sleeping 1 s).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

import orjson
import pytest
import trio
import trio.testing

from apix_trio.broker.events import Broker
from apix_trio.broker.groups import (
    RELEASED,
    RELEASED_IDLE,
    ConsumerGroups,
    dead_letter_channel,
    dead_letter_key,
)
from apix_trio.broker.memory.events import open_memory_broker
from apix_trio.broker.model import Retention
from apix_trio.protocol.event import Event
from apix_trio.settings import BrokerSettings, Settings
from tests.brokers import REDIS_KINDS, redis_target

LONG = Retention(history_size=1000, history_ttl=3600.0, dedupe_window=600.0)
TIMEOUT = 20.0
C1, C2, C3 = "node-a:c1", "node-a:c2", "node-b:c3"


class Received:
    """The broker listener: `(org, channel, event)`, waitable."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, Event]] = []
        self._grew = trio.Event()

    def __call__(self, org: str, channel: str, event: Event) -> None:
        self.items.append((org, channel, event))
        self._grew.set()
        self._grew = trio.Event()

    async def wait_for(self, org: str, channel: str) -> Event:
        while True:
            for o, c, event in self.items:
                if (o, c) == (org, channel):
                    return event
            await self._grew.wait()


@pytest.fixture(params=["memory", *REDIS_KINDS])
def broker_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clock(broker_kind: str) -> trio.testing.MockClock | None:
    """pytest-trio runs the test on this clock when it is one (memory only)."""
    return trio.testing.MockClock(autojump_threshold=0) if broker_kind == "memory" else None


def _open(kind: str, request: pytest.FixtureRequest) -> AbstractAsyncContextManager[Broker]:
    if kind == "memory":
        return open_memory_broker()
    from apix_trio.broker.redis.events import open_redis_broker

    url, extra = redis_target(kind, request)
    prefix = f"apixtest-{uuid.uuid4().hex[:12]}"
    return open_redis_broker(
        Settings(broker=BrokerSettings(redis_url=url, key_prefix=prefix, **extra))
    )


@pytest.fixture
async def broker(
    broker_kind: str, clock: trio.testing.MockClock | None, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Broker, Received]]:
    received = Received()
    async with _open(broker_kind, request) as opened:
        opened.set_listener(received)
        yield opened, received


@pytest.fixture
def org() -> str:
    return f"o{uuid.uuid4().hex[:10]}"


async def publish(b: Broker, org: str, channel: str, n: int, r: Retention = LONG) -> list[str]:
    out = []
    for i in range(n):
        published = await b.publish(
            org, channel, f'{{"n":{i}}}', sender="pub", key=None, retention=r
        )
        out.append(published.event.id)
    return out


def ids_of(deliveries) -> list[str]:  # type: ignore[no-untyped-def]
    return [d.event.id for d in deliveries]


async def pending_map(g: ConsumerGroups, org: str, channel: str, group: str) -> dict[str, str]:
    return {p.id: p.consumer for p in await g.pending(org, channel, group)}


# -- tests ---------------------------------------------------------------------


async def test_a_group_sees_only_events_published_after_it_was_joined(broker, org):
    b, _ = broker
    g = b.groups
    with trio.fail_after(TIMEOUT):
        await publish(b, org, "jobs", 2)
        await g.join(org, "jobs", "workers")
        after = await publish(b, org, "jobs", 3)
        got = await g.read_new(org, "jobs", "workers", [(C1, 10)])
        assert [(c, d.event.id, d.attempt) for c, d in got] == [(C1, i, 1) for i in after]
        assert got[0][1].event.data == '{"n":0}' and got[0][1].event.sender == "pub"
        assert await g.read_new(org, "jobs", "workers", [(C1, 10)]) == []


async def test_joining_an_empty_channel_then_publishing_delivers_from_the_first_event(broker, org):
    b, _ = broker
    g = b.groups
    with trio.fail_after(TIMEOUT):
        await g.join(org, "fresh", "workers")
        await g.join(org, "fresh", "workers")  # idempotent
        first = await publish(b, org, "fresh", 2)
        got = await g.read_new(org, "fresh", "workers", [(C1, 10)])
        assert ids_of(d for _, d in got) == first


async def test_read_new_hands_out_round_robin_within_each_count(broker, org):
    b, _ = broker
    g = b.groups
    with trio.fail_after(TIMEOUT):
        await g.join(org, "jobs", "w")
        e = await publish(b, org, "jobs", 7)
        got = await g.read_new(org, "jobs", "w", [(C1, 1), (C2, 3), (C3, 2)])
        assert [(c, d.event.id) for c, d in got] == [
            (C1, e[0]),
            (C2, e[1]),
            (C3, e[2]),
            (C2, e[3]),
            (C3, e[4]),
            (C2, e[5]),
        ]
        assert all(d.attempt == 1 for _, d in got)
        assert await pending_map(g, org, "jobs", "w") == {d.event.id: c for c, d in got}
        rest = await g.read_new(org, "jobs", "w", [(C2, 0), (C3, 5)])
        assert [(c, d.event.id) for c, d in rest] == [(C3, e[6])]
        entries = await g.pending(org, "jobs", "w", C3)
        assert [p.id for p in entries] == [e[2], e[4], e[6]]
        assert all(p.attempt == 1 and p.consumer == C3 for p in entries)


async def test_groups_are_independent_and_org_scoped(broker, org):
    b, _ = broker
    g = b.groups
    other = org + "x"
    with trio.fail_after(TIMEOUT):
        for group in ("a", "b"):
            await g.join(org, "jobs", group)
        await g.join(other, "jobs", "a")
        e = await publish(b, org, "jobs", 2)
        for group in ("a", "b"):
            got = await g.read_new(org, "jobs", group, [(C1, 10)])
            assert ids_of(d for _, d in got) == e
        assert await g.read_new(other, "jobs", "a", [(C1, 10)]) == []
        assert await g.ack(other, "jobs", "a", e) == 0
        assert len(await g.pending(org, "jobs", "a")) == 2


async def test_ack_counts_only_what_was_pending(broker, org):
    b, _ = broker
    g = b.groups
    with trio.fail_after(TIMEOUT):
        await g.join(org, "jobs", "w")
        e = await publish(b, org, "jobs", 3)
        await g.read_new(org, "jobs", "w", [(C1, 2), (C2, 2)])
        # group-wide: whichever consumer holds them; duplicates count once
        assert await g.ack(org, "jobs", "w", [e[0], e[1], e[0]]) == 2
        assert await g.ack(org, "jobs", "w", [e[0], "1-1"]) == 0
        assert list(await pending_map(g, org, "jobs", "w")) == [e[2]]
        assert await g.ack(org, "jobs", "nosuchgroup", [e[2]]) == 0


async def test_ack_many_counts_each_list_as_if_acked_in_turn(broker, org):
    b, _ = broker
    g = b.groups
    with trio.fail_after(TIMEOUT):
        await g.join(org, "jobs", "w")
        e = await publish(b, org, "jobs", 5)
        await g.read_new(org, "jobs", "w", [(C1, 3), (C2, 2)])
        counts = await g.ack_many(
            org, "jobs", "w", [[e[0], e[1]], [e[1], e[2], e[2]], [], ["1-1"], [e[4]]]
        )
        assert counts == [2, 1, 0, 0, 1]  # e[1] counts for the first list only
        assert list(await pending_map(g, org, "jobs", "w")) == [e[3]]
        assert await g.ack_many(org, "jobs", "nosuchgroup", [[e[3]]]) == [0]
        assert await g.ack_many(org, "jobs", "w", []) == []


async def test_claim_moves_pending_events_and_counts_the_attempt(broker, org):
    b, _ = broker
    g = b.groups
    with trio.fail_after(TIMEOUT):
        await g.join(org, "jobs", "w")
        e = await publish(b, org, "jobs", 3)
        await g.read_new(org, "jobs", "w", [(C1, 3)])
        await g.ack(org, "jobs", "w", [e[1]])
        moved = await g.claim(org, "jobs", "w", C2, [e[0], e[1], e[2], e[0]])
        assert [(d.event.id, d.attempt) for d in moved] == [(e[0], 2), (e[2], 2)]
        again = await g.claim(org, "jobs", "w", C2, [e[2]])
        assert [(d.event.id, d.attempt) for d in again] == [(e[2], 3)]
        assert await pending_map(g, org, "jobs", "w") == {e[0]: C2, e[2]: C2}
        assert await g.claim(org, "jobs", "w", C2, []) == []


async def test_a_trimmed_pending_event_is_acked_by_the_claim_that_meets_it(broker, org):
    b, _ = broker
    g = b.groups
    small = Retention(history_size=2, history_ttl=3600.0, dedupe_window=600.0)
    with trio.fail_after(TIMEOUT):
        await g.join(org, "jobs", "w")
        first = await publish(b, org, "jobs", 2, small)
        await g.read_new(org, "jobs", "w", [(C1, 2)])
        await publish(b, org, "jobs", 2, small)  # trims both
        assert await g.claim(org, "jobs", "w", C2, first) == []
        assert await g.pending(org, "jobs", "w") == []


async def test_events_trimmed_before_they_were_read_are_skipped(broker, org):
    b, _ = broker
    g = b.groups
    small = Retention(history_size=2, history_ttl=3600.0, dedupe_window=600.0)
    with trio.fail_after(TIMEOUT):
        await g.join(org, "jobs", "w")
        e = await publish(b, org, "jobs", 5, small)
        got = await g.read_new(org, "jobs", "w", [(C1, 10)])
        assert ids_of(d for _, d in got) == e[-2:]


async def test_release_parks_events_for_anybody_then_claim_idle_takes_them(broker, org):
    b, _ = broker
    g = b.groups
    with trio.fail_after(TIMEOUT):
        await g.join(org, "jobs", "w")
        e = await publish(b, org, "jobs", 3)
        await g.read_new(org, "jobs", "w", [(C1, 2), (C2, 1)])
        assert await g.release(org, "jobs", "w", C1) == 2
        parked = await g.pending(org, "jobs", "w")
        assert [(p.id, p.consumer, p.attempt) for p in parked] == [
            (e[0], RELEASED, 1),
            (e[1], C2, 1),
            (e[2], RELEASED, 1),
        ]
        assert parked[0].idle >= RELEASED_IDLE - 60
        # released ones are claimable whatever min_idle; C2's is not idle
        took = await g.claim_idle(org, "jobs", "w", C3, 3600.0, 10)
        assert [(d.event.id, d.attempt) for d in took] == [(e[0], 2), (e[2], 2)]
        assert await pending_map(g, org, "jobs", "w") == {e[0]: C3, e[1]: C2, e[2]: C3}
        assert await g.release(org, "jobs", "w", "node-z:nobody") == 0


async def test_claim_idle_takes_idle_events_oldest_first_up_to_count(broker, org):
    b, _ = broker
    g = b.groups
    with trio.fail_after(TIMEOUT):
        await g.join(org, "jobs", "w")
        e = await publish(b, org, "jobs", 4)
        await g.read_new(org, "jobs", "w", [(C1, 4)])
        assert await g.claim_idle(org, "jobs", "w", C2, 60.0, 10) == []
        await trio.sleep(1.0)
        assert await g.touch(org, "jobs", "w", C1, [e[2]]) == [e[2]]
        took = await g.claim_idle(org, "jobs", "w", C2, 0.5, 2)
        assert [(d.event.id, d.attempt) for d in took] == [(e[0], 2), (e[1], 2)]
        took = await g.claim_idle(org, "jobs", "w", C2, 0.5, 10)
        assert [(d.event.id, d.attempt) for d in took] == [(e[3], 2)]
        assert await pending_map(g, org, "jobs", "w") == {e[0]: C2, e[1]: C2, e[2]: C1, e[3]: C2}
        assert await g.claim_idle(org, "jobs", "w", C2, 0.5, 0) == []


async def test_touch_keeps_only_what_the_consumer_still_holds(broker, org):
    b, _ = broker
    g = b.groups
    with trio.fail_after(TIMEOUT):
        await g.join(org, "jobs", "w")
        e = await publish(b, org, "jobs", 3)
        await g.read_new(org, "jobs", "w", [(C1, 3)])
        await g.ack(org, "jobs", "w", [e[0]])
        await g.claim(org, "jobs", "w", C2, [e[1]])
        await trio.sleep(1.0)
        assert await g.touch(org, "jobs", "w", C1, [e[0], e[1], e[2], e[2]]) == [e[2]]
        entries = {p.id: p for p in await g.pending(org, "jobs", "w")}
        assert entries[e[1]].consumer == C2  # never taken back
        assert entries[e[2]].attempt == 1 and entries[e[2]].idle < 0.5
        assert entries[e[1]].idle >= 0.5


async def test_remove_idle_consumers_spares_those_with_pending_events(broker, org):
    b, _ = broker
    g = b.groups
    with trio.fail_after(TIMEOUT):
        await g.join(org, "jobs", "w")
        e = await publish(b, org, "jobs", 2)
        await g.read_new(org, "jobs", "w", [(C1, 1), (C2, 1)])
        await g.ack(org, "jobs", "w", [e[0]])
        assert await g.remove_idle_consumers(org, "jobs", "w", 3600.0) == []
        await trio.sleep(1.0)
        assert await g.remove_idle_consumers(org, "jobs", "w", 0.5) == [C1]
        assert await pending_map(g, org, "jobs", "w") == {e[1]: C2}
        # a removed consumer comes back with the next thing it is handed
        e2 = await publish(b, org, "jobs", 1)
        got = await g.read_new(org, "jobs", "w", [(C1, 1)])
        assert [(c, d.event.id) for c, d in got] == [(C1, e2[0])]


async def test_dead_letter_publishes_to_the_dlq_channel_and_acks(broker, org):
    b, received = broker
    g = b.groups
    dlq = dead_letter_channel("jobs")
    with trio.fail_after(TIMEOUT):
        await g.join(org, "jobs", "w")
        await b.publish(org, "jobs", '{"task":1}', sender="alice", key="k1", retention=LONG)
        [(_, delivery)] = await g.read_new(org, "jobs", "w", [(C1, 1)])
        [delivery] = await g.claim(org, "jobs", "w", C1, [delivery.event.id])
        letter = await g.dead_letter(org, "jobs", "w", delivery, LONG)
        original = delivery.event
        assert orjson.loads(letter.data) == {
            "event": {
                "id": original.id,
                "ts": original.ts,
                "data": {"task": 1},
                "from": "alice",
                "key": "k1",
            },
            "group": "w",
            "attempts": 2,
        }
        assert letter.sender == "alice"
        assert letter.key == dead_letter_key("w", original.id)
        assert await g.pending(org, "jobs", "w") == []
        page = await b.read_latest(org, dlq, 10, LONG)
        assert [ev.id for ev in page.events] == [letter.id]
        assert (await received.wait_for(org, dlq)).id == letter.id
        # a retry (say after a failure between publish and ack) adds nothing
        again = await g.dead_letter(org, "jobs", "w", delivery, LONG)
        assert again.id == letter.id
        assert len((await b.read_latest(org, dlq, 10, LONG)).events) == 1
