"""The broker contract: what every broker promises (apix_trio/broker/base.py).

One suite, parametrised by `broker_kind` over "memory", "redis" and
"redis-cluster" (the session's Redis Cluster, tests/brokers.py); select a
side with `-k memory`, `-k redis` or `-k redis-cluster`. The Redis side opens
`apix_trio.broker.redis.events.open_redis_broker` against the `redis_url` fixture (a
real redis-server started by tests/conftest.py), imported only when used.

Time. The memory broker gets a fake wall clock that `Timeline` moves; Redis
expiry runs on real time, so the few timing tests use 1 s windows and
`Timeline.eventually` polls under `trio.fail_after` (the only real waiting in
the suite, and only on the Redis side).

Approximate trimming. Redis may keep more than `history_size` (`MAXLEN ~`),
so the suite asserts "the retained events are a contiguous suffix of what was
published, at least `history_size` long", and checks `recovered` against
`expected_recovered`, an oracle computed from what is actually retained. Tests
that need trimming publish enough (300 events for a size of 5) that any sane
approximation has trimmed something; they assert that it did.

What the suite asserts about `recovered` (read after `since`; D is the
newest deleted id, i.e. the one just before the first retained event, or the
last id when nothing is retained):

- true for any `since` ("0", "0-0" or any id) while nothing was ever deleted,
  whatever the `limit`;
- after trimming: true for a retained `since` and for `since == D`; false for
  any earlier id and for "0";
- false for a `since` greater than the channel's last id, also on an empty
  channel;
- false for a `since` that was never an id of this channel but is after D:
  one before the first event (a client coming back from an older incarnation
  of the stream, e.g. after FLUSHALL) and one strictly between two retained
  ids. base.py's rule ("a real id the client saw is either still stored, or
  not after the highest deleted id") decides both, and both are cheap to
  detect: a bisect in memory, an inclusive `XRANGE since + COUNT limit+1` in
  Redis (the first entry is `since` itself or not);
- after the history expired (`history_ttl`): no events, `position` is still
  the last id, true for `since == last`, false for anything earlier, and the
  next id is greater than every old one.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager

import attrs
import pytest
import trio

from apix_trio.broker.events import Broker
from apix_trio.broker.memory.events import open_memory_broker
from apix_trio.broker.model import Published, Retention
from apix_trio.protocol.event import Event
from apix_trio.protocol.ids import ZERO, StreamId, format_id, parse_id
from apix_trio.settings import BrokerSettings, Settings
from tests.brokers import REDIS_KINDS, FakeWallClock, passes_within, redis_target

DELIVERY_TIMEOUT = 5.0
"""Seconds a listener may take to see a stored event (Redis: via the bus)."""
LONG = Retention(history_size=1000, history_ttl=3600.0, dedupe_window=600.0)
ID_RE = re.compile(r"^(0|[1-9][0-9]*)-(0|[1-9][0-9]*)$")

BrokerUnderTest = tuple[Broker, "Received"]


class Received(list[tuple[str, str, Event]]):
    """What the listener was handed, `(org, channel, event)`; tests can wait
    for more to arrive (Redis delivers through the bus, asynchronously)."""

    def __init__(self) -> None:
        super().__init__()
        self._grew = trio.Event()

    def listener(self, org: str, channel: str, event: Event) -> None:
        """The broker's `Listener`."""
        self.append((org, channel, event))
        self._grew.set()
        self._grew = trio.Event()

    def of(self, org: str, channel: str) -> list[Event]:
        return [event for o, c, event in self if (o, c) == (org, channel)]

    async def wait_for(self, org: str, channel: str, count: int) -> list[Event]:
        """The channel's events once at least `count` arrived."""
        with trio.fail_after(DELIVERY_TIMEOUT):
            while len(self.of(org, channel)) < count:
                await self._grew.wait()
        return self.of(org, channel)


@attrs.define
class Timeline:
    """Moves time for the broker under test: the fake clock for memory, real
    time (waited for, polling) for Redis."""

    clock: FakeWallClock | None

    def tick(self) -> None:
        """Let the next id fall in a later millisecond (real time moves itself)."""
        if self.clock is not None:
            self.clock.advance(0.005)

    async def eventually(self, seconds: float, check: Callable[[], Awaitable[None]]) -> None:
        """Assert that `check` passes once `seconds` have gone by."""
        if self.clock is not None:
            self.clock.advance(seconds + 0.001)
            await check()
            return
        await passes_within(seconds, check)


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(params=["memory", *REDIS_KINDS])
def broker_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def wall_clock(broker_kind: str) -> FakeWallClock | None:
    return FakeWallClock() if broker_kind == "memory" else None


@pytest.fixture
def timeline(wall_clock: FakeWallClock | None) -> Timeline:
    return Timeline(wall_clock)


@pytest.fixture
def redis_settings(broker_kind: str, request: pytest.FixtureRequest) -> Settings | None:
    """Settings for the Redis broker; a fresh key prefix isolates each test."""
    if broker_kind == "memory":
        return None
    redis_url, extra = redis_target(broker_kind, request)
    prefix = f"apixtest-{uuid.uuid4().hex[:12]}"
    return Settings(broker=BrokerSettings(redis_url=redis_url, key_prefix=prefix, **extra))


def _open(
    kind: str, clock: FakeWallClock | None, settings: Settings | None
) -> AbstractAsyncContextManager[Broker]:
    if kind == "memory":
        assert clock is not None
        return open_memory_broker(wall_clock=clock)
    from apix_trio.broker.redis.events import open_redis_broker  # only the Redis side needs it

    assert settings is not None
    return open_redis_broker(settings)


@pytest.fixture
async def broker(
    broker_kind: str, wall_clock: FakeWallClock | None, redis_settings: Settings | None
) -> AsyncIterator[BrokerUnderTest]:
    """`(broker, received)`: an open broker whose listener appends to `received`."""
    received = Received()
    async with _open(broker_kind, wall_clock, redis_settings) as opened:
        opened.set_listener(received.listener)
        yield opened, received


def _org() -> str:
    return f"o{uuid.uuid4().hex[:10]}"


@pytest.fixture
def org() -> str:
    return _org()


@pytest.fixture
def other_org() -> str:
    return _org()


# -- helpers -------------------------------------------------------------------


async def publish_n(
    b: Broker,
    org: str,
    channel: str,
    n: int,
    retention: Retention = LONG,
    *,
    timeline: Timeline | None = None,
) -> list[Event]:
    events = []
    for i in range(n):
        published = await b.publish(
            org, channel, f'{{"n":{i}}}', sender="alice", key=None, retention=retention
        )
        assert not published.duplicate
        events.append(published.event)
        if timeline is not None:
            timeline.tick()
    return events


async def publish_many(
    b: Broker, org: str, channel: str, n: int, retention: Retention = LONG
) -> list[Event]:
    """Publish `n` events at once (Redis batches them), returned in id order."""
    events: list[Event] = []

    async def one(i: int) -> None:
        published = await b.publish(
            org, channel, f'{{"n":{i}}}', sender="alice", key=None, retention=retention
        )
        assert not published.duplicate
        events.append(published.event)

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
    return sorted(events, key=lambda event: parse_id(event.id))


async def retained_ids(b: Broker, org: str, channel: str, retention: Retention = LONG) -> list[str]:
    page = await b.read_after(org, channel, "0", 100_000, retention)
    return [event.id for event in page.events]


def ids_of(events: list[Event] | tuple[Event, ...]) -> list[str]:
    return [event.id for event in events]


def expected_recovered(published: list[str], retained: list[str], since: str) -> bool:
    """base.py's `recovered` rule, computed from outside the broker."""
    since_id = parse_id(since)
    last = parse_id(published[-1]) if published else ZERO
    if since_id > last:
        return False
    if retained:
        first = published.index(retained[0])
        max_deleted = parse_id(published[first - 1]) if first else ZERO
    else:
        max_deleted = last
    return since_id == max_deleted or since_id in {parse_id(i) for i in retained}


def assert_suffix(retained: list[str], published: list[str], at_least: int) -> None:
    assert len(retained) >= min(at_least, len(published))
    assert retained == published[len(published) - len(retained) :]


# -- ids and delivery ----------------------------------------------------------


async def test_ids_are_strictly_increasing_stream_ids(
    broker: BrokerUnderTest, org: str, timeline: Timeline
) -> None:
    b, _ = broker
    results: list[Published] = []
    for i in range(30):
        results.append(
            await b.publish(org, "c", f"[{i}]", sender="bob", key=f"k{i}", retention=LONG)
        )
        if i % 7 == 0:
            timeline.tick()
    parsed: list[StreamId] = []
    for i, result in enumerate(results):
        assert not result.duplicate
        assert ID_RE.match(result.event.id)
        assert (result.event.data, result.event.sender, result.event.key) == (
            f"[{i}]",
            "bob",
            f"k{i}",
        )
        assert isinstance(result.event.ts, int)
        parsed.append(parse_id(result.event.id))
    assert parsed == sorted(set(parsed))
    assert await b.position(org, "c") == results[-1].event.id
    assert b.ready


async def test_listener_gets_every_event_once_in_id_order(
    broker: BrokerUnderTest, org: str
) -> None:
    b, received = broker
    published: dict[str, list[Event]] = {"a": [], "b.x": []}
    for i in range(20):
        for channel in published:
            result = await b.publish(org, channel, str(i), sender="s", key=None, retention=LONG)
            published[channel].append(result.event)
    # A sentinel after everything: if any event were doubled, it would have
    # arrived before the sentinel (per channel, in id order).
    for channel, events in published.items():
        sentinel = await b.publish(org, channel, "null", sender="s", key=None, retention=LONG)
        events.append(sentinel.event)
    for channel, events in published.items():
        got = await received.wait_for(org, channel, len(events))
        assert got == events


# -- orgs ----------------------------------------------------------------------


async def test_same_channel_name_in_two_orgs_is_two_channels(
    broker: BrokerUnderTest, org: str, other_org: str
) -> None:
    b, received = broker
    small = Retention(history_size=1, history_ttl=3600.0, dedupe_window=600.0)
    mine = [
        (await b.publish(org, "room", str(i), sender="a", key=f"k{i}", retention=LONG)).event
        for i in range(3)
    ]
    assert await b.position(other_org, "room") == "0-0"
    page = await b.read_after(other_org, "room", "0", 100, LONG)
    assert (page.events, page.position, page.recovered) == ((), "0-0", True)
    assert (await b.read_latest(other_org, "room", 100, LONG)).events == ()

    theirs = await b.publish(other_org, "room", "x", sender="b", key="k0", retention=small)
    assert not theirs.duplicate
    assert parse_id(theirs.event.id)[1] == 0  # the first id of a fresh channel
    await publish_many(b, other_org, "room", 300, small)

    assert await retained_ids(b, org, "room") == ids_of(mine)
    assert (await b.read_after(org, "room", "0", 100, LONG)).recovered
    assert await b.position(org, "room") == mine[-1].id
    assert await received.wait_for(org, "room", 3) == mine
    assert len(await received.wait_for(other_org, "room", 301)) == 301


# -- retention -----------------------------------------------------------------


async def test_history_keeps_at_least_the_newest_n(broker: BrokerUnderTest, org: str) -> None:
    b, _ = broker
    five = Retention(history_size=5, history_ttl=3600.0, dedupe_window=600.0)
    published = ids_of(await publish_many(b, org, "c", 300, five))
    retained = await retained_ids(b, org, "c", five)
    assert_suffix(retained, published, 5)
    assert len(retained) < 300, "nothing was trimmed"
    latest = await b.read_latest(org, "c", 5, five)
    assert ids_of(latest.events) == published[-5:]
    assert ids_of((await b.read_latest(org, "c", 1000, five)).events) == retained


async def test_history_size_zero_still_gives_ids(broker: BrokerUnderTest, org: str) -> None:
    b, _ = broker
    none = Retention(history_size=0, history_ttl=3600.0, dedupe_window=600.0)
    published = ids_of(await publish_n(b, org, "c", 3, none))
    assert [parse_id(i) for i in published] == sorted({parse_id(i) for i in published})
    assert await b.position(org, "c") == published[-1]
    assert_suffix(await retained_ids(b, org, "c", none), published, 0)
    page = await b.read_after(org, "c", published[-1], 10, none)
    assert (page.events, page.recovered) == ((), True)


# -- reads ---------------------------------------------------------------------


async def test_read_after_pages_oldest_first(broker: BrokerUnderTest, org: str) -> None:
    b, _ = broker
    published = ids_of(await publish_many(b, org, "c", 250))
    collected: list[str] = []
    since = "0"
    for expected_len in (100, 100, 50, 0):
        page = await b.read_after(org, "c", since, 100, LONG)
        got = ids_of(page.events)
        assert len(got) == expected_len
        assert all(parse_id(i) > parse_id(since) for i in got)
        assert [parse_id(i) for i in got] == sorted(parse_id(i) for i in got)
        assert (page.position, page.recovered) == (published[-1], True)
        collected += got
        since = got[-1] if got else since
    assert collected == published
    assert ids_of((await b.read_after(org, "c", "0-0", 1000, LONG)).events) == published
    middle = await b.read_after(org, "c", published[120], 1000, LONG)
    assert ids_of(middle.events) == published[121:]


async def test_read_latest_is_the_newest_oldest_first(broker: BrokerUnderTest, org: str) -> None:
    b, _ = broker
    published = ids_of(await publish_n(b, org, "c", 10))
    page = await b.read_latest(org, "c", 3, LONG)
    assert (ids_of(page.events), page.position, page.recovered) == (
        published[-3:],
        published[-1],
        True,
    )
    assert ids_of((await b.read_latest(org, "c", 100, LONG)).events) == published


async def test_an_empty_channel_is_at_zero(broker: BrokerUnderTest, org: str) -> None:
    b, _ = broker
    assert await b.position(org, "nothing.here") == "0-0"
    for since in ("0", "0-0"):
        page = await b.read_after(org, "nothing.here", since, 10, LONG)
        assert (page.events, page.position, page.recovered) == ((), "0-0", True)
    latest = await b.read_latest(org, "nothing.here", 10, LONG)
    assert (latest.events, latest.position, latest.recovered) == ((), "0-0", True)


# -- idempotency ---------------------------------------------------------------


async def test_a_duplicate_key_returns_the_first_event_and_stores_nothing(
    broker: BrokerUnderTest, org: str
) -> None:
    b, received = broker
    first = await b.publish(org, "c", "1", sender="a", key="k", retention=LONG)
    again = await b.publish(org, "c", "2", sender="a", key="k", retention=LONG)
    assert again.duplicate
    assert (again.event.id, again.event.ts) == (first.event.id, first.event.ts)
    assert await b.position(org, "c") == first.event.id
    assert await retained_ids(b, org, "c") == [first.event.id]
    sentinel = await b.publish(org, "c", "3", sender="a", key=None, retention=LONG)
    assert await received.wait_for(org, "c", 2) == [first.event, sentinel.event]


async def test_the_same_key_elsewhere_is_not_a_duplicate(
    broker: BrokerUnderTest, org: str, other_org: str
) -> None:
    b, _ = broker
    first = await b.publish(org, "c", "1", sender="a", key="k", retention=LONG)
    for where in ((org, "d"), (other_org, "c")):
        result = await b.publish(*where, "1", sender="a", key="k", retention=LONG)
        assert not result.duplicate
        assert await retained_ids(b, *where) == [result.event.id]
    other_key = await b.publish(org, "c", "1", sender="a", key="k2", retention=LONG)
    assert not other_key.duplicate
    assert await retained_ids(b, org, "c") == [first.event.id, other_key.event.id]


async def test_a_duplicate_outlives_the_first_events_history(
    broker: BrokerUnderTest, org: str
) -> None:
    b, _ = broker
    one = Retention(history_size=1, history_ttl=3600.0, dedupe_window=600.0)
    first = await b.publish(org, "c", "1", sender="a", key="k", retention=one)
    await publish_many(b, org, "c", 300, one)
    again = await b.publish(org, "c", "1", sender="a", key="k", retention=one)
    assert again.duplicate
    assert (again.event.id, again.event.ts) == (first.event.id, first.event.ts)


async def test_a_key_is_forgotten_after_the_dedupe_window(
    broker: BrokerUnderTest, org: str, timeline: Timeline
) -> None:
    b, _ = broker
    window = Retention(history_size=100, history_ttl=3600.0, dedupe_window=1.0)
    first = await b.publish(org, "c", "1", sender="a", key="k", retention=window)
    assert (await b.publish(org, "c", "1", sender="a", key="k", retention=window)).duplicate

    async def stored_again() -> None:
        result = await b.publish(org, "c", "1", sender="a", key="k", retention=window)
        assert not result.duplicate
        assert parse_id(result.event.id) > parse_id(first.event.id)

    await timeline.eventually(1.0, stored_again)
    assert (await b.publish(org, "c", "1", sender="a", key="k", retention=window)).duplicate


# -- recovered -----------------------------------------------------------------


async def test_recovered_while_nothing_was_deleted(broker: BrokerUnderTest, org: str) -> None:
    b, _ = broker
    published = ids_of(await publish_n(b, org, "c", 20))
    for since in ["0", "0-0", *published]:
        for limit in (1, 100):
            assert (await b.read_after(org, "c", since, limit, LONG)).recovered, since


async def test_recovered_after_trimming_follows_the_rule(broker: BrokerUnderTest, org: str) -> None:
    b, _ = broker
    five = Retention(history_size=5, history_ttl=3600.0, dedupe_window=600.0)
    published = ids_of(await publish_many(b, org, "c", 300, five))
    retained = await retained_ids(b, org, "c", five)
    first = published.index(retained[0])
    assert first >= 2, "too little was trimmed to test anything"

    got: dict[str, bool] = {}

    async def read(since: str) -> None:
        got[since] = (await b.read_after(org, "c", since, 3, five)).recovered

    async with trio.open_nursery() as nursery:  # concurrently: Redis batches reads
        for since in ["0", *published]:
            nursery.start_soon(read, since)
    assert got == {since: expected_recovered(published, retained, since) for since in got}

    at_max_deleted = await b.read_after(org, "c", published[first - 1], 1000, five)
    assert (ids_of(at_max_deleted.events), at_max_deleted.recovered) == (retained, True)
    before = await b.read_after(org, "c", published[first - 2], 1000, five)
    assert (ids_of(before.events), before.recovered) == (retained, False)
    assert not (await b.read_after(org, "c", "0", 1, five)).recovered


async def test_not_recovered_after_the_last_id(broker: BrokerUnderTest, org: str) -> None:
    b, _ = broker
    assert not (await b.read_after(org, "c", "1-0", 10, LONG)).recovered
    published = ids_of(await publish_n(b, org, "c", 3))
    ms, seq = parse_id(published[-1])
    for since in (f"{ms}-{seq + 1}", f"{ms + 1}-0", f"{2**64 - 1}-{2**64 - 1}"):
        page = await b.read_after(org, "c", since, 10, LONG)
        assert (page.events, page.position, page.recovered) == ((), published[-1], False)


async def test_not_recovered_for_a_since_that_was_never_an_id(
    broker: BrokerUnderTest, org: str, timeline: Timeline
) -> None:
    b, _ = broker
    published = ids_of(await publish_n(b, org, "c", 3, timeline=timeline))
    ms, _ = parse_id(published[0])
    # An id from an older incarnation of the stream: nothing after it was
    # deleted in this one, but the client missed what the old one held.
    old = await b.read_after(org, "c", f"{ms - 1}-7", 10, LONG)
    assert (ids_of(old.events), old.recovered) == (published, False)

    # Strictly between two retained ids, after the last deleted one (none).
    for _ in range(1000):
        published += ids_of(await publish_n(b, org, "c", 1))
        a, z = parse_id(published[-2]), parse_id(published[-1])
        if z[0] > a[0]:
            break
        timeline.tick()
    else:
        pytest.fail("the clock never reached a new millisecond")
    between = format_id((a[0], a[1] + 1))
    page = await b.read_after(org, "c", between, 10, LONG)
    assert (ids_of(page.events), page.recovered) == ([published[-1]], False)


async def test_history_expires_but_the_position_stays(
    broker: BrokerUnderTest, org: str, timeline: Timeline
) -> None:
    b, _ = broker
    short = Retention(history_size=100, history_ttl=1.0, dedupe_window=600.0)
    published = ids_of(await publish_n(b, org, "c", 3, short))
    assert await retained_ids(b, org, "c", short) == published

    async def expired() -> None:
        assert await retained_ids(b, org, "c", short) == []

    await timeline.eventually(1.0, expired)
    assert await b.position(org, "c") == published[-1]
    assert (await b.read_latest(org, "c", 10, short)).events == ()
    at_last = await b.read_after(org, "c", published[-1], 10, short)
    assert (at_last.events, at_last.position, at_last.recovered) == ((), published[-1], True)
    for since in ("0", published[0], published[1]):
        assert not (await b.read_after(org, "c", since, 10, short)).recovered, since
    after = await b.publish(org, "c", "new", sender="a", key=None, retention=short)
    assert parse_id(after.event.id) > parse_id(published[-1])
