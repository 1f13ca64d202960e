"""Redis broker specifics, against real redis-server processes (conftest.py).

The shared behaviour of every broker is in test_broker_contract.py; this file
covers what only Redis has: batching under concurrency, several nodes on one
Redis, the key layout, and failures (kill -9, SIGSTOP, FLUSHALL, trimmed bus).
Real clock everywhere (redis-py's timeouts run on it), each test bounded by
`trio.fail_after`. Tests inspect Redis with redis-py's synchronous client.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis
import trio

from apix_trio.broker.model import BrokerUnavailable, Retention
from apix_trio.broker.redis.events import RedisBroker, RedisTuning, open_redis_broker
from apix_trio.broker.redis.keys import KeyLayout, escape, hash_slot, shard_tags, slot_share
from apix_trio.broker.redis.scripts import PUBLISH
from apix_trio.broker.redis.support import backoff_delay
from apix_trio.protocol.event import Event
from apix_trio.protocol.ids import parse_id
from apix_trio.settings import BrokerSettings, Settings
from tests.conftest import RedisServer, RedisServerFactory

LONG = Retention(history_size=10_000, history_ttl=3600.0, dedupe_window=600.0)
PREFIX = "apixtest"
TIMEOUT = 1.0
"""operation_timeout of the failure tests (seconds)."""
SLACK = 0.75
"""How much later than operation_timeout BrokerUnavailable may come."""


def settings(url: str, **broker: object) -> Settings:
    values: dict[str, object] = {"redis_url": url, "key_prefix": PREFIX, **broker}
    return Settings(broker=BrokerSettings(**values))  # type: ignore[arg-type]


def inspector(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)


class Received:
    """A listener that records `(org, channel, event)` and can be waited on."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, Event]] = []
        self._grew = trio.Event()

    def __call__(self, org: str, channel: str, event: Event) -> None:
        self.items.append((org, channel, event))
        self._grew.set()
        self._grew = trio.Event()

    def ids(self, org: str, channel: str) -> list[str]:
        return [e.id for o, c, e in self.items if (o, c) == (org, channel)]

    async def wait_until(self, done: Callable[[], bool], seconds: float = 10.0) -> None:
        with trio.fail_after(seconds):
            while not done():
                await self._grew.wait()


@asynccontextmanager
async def node(
    url: str, tuning: RedisTuning | None = None, **broker: object
) -> AsyncIterator[tuple[RedisBroker, Received]]:
    received = Received()
    async with open_redis_broker(settings(url, **broker), tuning=tuning) as opened:
        opened.set_listener(received)
        yield opened, received


async def wait_for(check: Callable[[], bool], seconds: float) -> None:
    """Poll `check` (for states nothing signals, such as `ready`)."""
    with trio.fail_after(seconds):
        while True:
            if check():
                return
            await trio.sleep(0.02)


def strictly_increasing(event_ids: list[str]) -> bool:
    parsed = [parse_id(i) for i in event_ids]
    return all(a < b for a, b in itertools.pairwise(parsed))


def wait_for_replica_online(primary: RedisServer) -> None:
    """Until a write on the primary is acknowledged by the replica: right
    after the sync the replica may take a second to answer WAIT."""
    client = inspector(primary.url)
    deadline = time.monotonic() + 10
    while True:
        client.set("probe", "1")
        if client.wait(1, 200) >= 1:
            return
        assert time.monotonic() < deadline, "the replica did not come online"


# -- pure helpers ----------------------------------------------------------------


def test_escape_keeps_plain_names_and_hides_separators() -> None:
    assert escape("chat.room-4_2@x") == "chat.room-4_2@x"
    assert escape("a:b") == "a%3Ab"
    assert escape("{b1}*?[]%\\ é") == "%7Bb1%7D%2A%3F%5B%5D%25%5C%20%C3%A9"
    for text in ("a:b", "{x}", "k:*", "%3A", ""):
        assert not set(escape(text)) & set(":{}*?[]\\ ")


def test_key_layout_puts_a_channel_in_one_slot() -> None:
    layout = KeyLayout("apix", 16)
    keys = layout.channel("acme", "user:alice")
    tag = "{" + shard_tags(16)[keys.shard] + "}"
    assert tag.startswith(f"{{b{keys.shard}.")
    assert keys.stream == f"apix:{tag}:acme:c:user%3Aalice"
    assert keys.meta == f"apix:{tag}:acme:m:user%3Aalice"
    assert keys.bus == f"apix:{tag}:bus"
    assert keys.idempotency("k:{1}") == f"apix:{tag}:acme:k:user%3Aalice:k%3A%7B1%7D"
    assert layout.channel("acme", "user:alice").shard == keys.shard  # stable
    assert {layout.shard_of("o", f"c{i}") for i in range(200)} == set(range(16))
    with pytest.raises(ValueError):
        KeyLayout("ap{x}", 16)


def test_shard_tags_put_each_shard_in_its_own_share_of_the_slots() -> None:
    for shards in (1, 3, 16, 1024):
        tags = shard_tags(shards)
        assert len(set(tags)) == shards
        for shard, tag in enumerate(tags):
            assert tag.startswith(f"b{shard}.")
            assert hash_slot(tag) in slot_share(shard, shards)
    layout = KeyLayout("apix", 16)
    assert [layout.slot(s) for s in range(16)] == sorted(layout.slot(s) for s in range(16))
    keys = layout.channel("acme", "chat.room42")
    assert {hash_slot(k) for k in (keys.stream, keys.meta, keys.bus, keys.bus_seq)} == {
        layout.slot(keys.shard)
    }
    # CRC16/XMODEM as Redis computes it (CLUSTER KEYSLOT); braces select the tag
    assert hash_slot("foo") == 12182
    assert hash_slot("{user1000}.following") == hash_slot("user1000") != hash_slot("{}user1000")
    assert hash_slot("foo{}{bar}") == hash_slot(b"foo{}{bar}")
    assert hash_slot("foo{{bar}}zap") == hash_slot("{bar")


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff_delay(n, 0.1, 1.0) for n in range(6)] == [0.0, 0.1, 0.2, 0.4, 0.8, 1.0]
    assert backoff_delay(10_000, 0.1, 1.0) == 1.0


# -- basics ------------------------------------------------------------------------


async def test_publish_and_read_roundtrip(redis_url: str) -> None:
    with trio.fail_after(15):
        async with node(redis_url) as (broker, received):
            assert broker.ready
            first = await broker.publish(
                "acme", "chat.room", '{"a":1}', sender="alice", key=None, retention=LONG
            )
            second = await broker.publish(
                "acme", "chat.room", '"two"', sender="bob", key="k1", retention=LONG
            )
            again = await broker.publish(
                "acme", "chat.room", '"other"', sender="carol", key="k1", retention=LONG
            )
            assert not first.duplicate and not second.duplicate
            assert again.duplicate and again.event == second.event
            assert parse_id(second.event.id) > parse_id(first.event.id)
            assert second.event == Event(second.event.id, second.event.ts, '"two"', "bob", "k1")

            page = await broker.read_after("acme", "chat.room", "0", 10, LONG)
            assert page.events == (first.event, second.event)
            assert (page.position, page.recovered) == (second.event.id, True)
            latest = await broker.read_latest("acme", "chat.room", 1, LONG)
            assert latest.events == (second.event,)
            assert await broker.position("acme", "chat.room") == second.event.id

            await received.wait_until(lambda: len(received.items) == 2)
            assert received.items == [
                ("acme", "chat.room", first.event),
                ("acme", "chat.room", second.event),
            ]
            stats = broker.statistics()
            assert (stats.bus.events, stats.bus.gaps, stats.batches.unavailable) == (2, 0, 0)


async def test_channel_stream_is_readable_with_redis_cli_commands(redis_url: str) -> None:
    with trio.fail_after(15):
        async with node(redis_url) as (broker, _):
            published = await broker.publish(
                "acme", "chat.room", "[1]", sender="alice", key="k", retention=LONG
            )
    keys = KeyLayout(PREFIX, 16).channel("acme", "chat.room")
    client = inspector(redis_url)
    assert client.xrange(keys.stream) == [
        (published.event.id, {"t": str(published.event.ts), "d": "[1]", "f": "alice", "k": "k"})
    ]
    assert client.hgetall(keys.meta) == {"last": published.event.id, "del": "0-0"}
    assert 3600 - 5 < client.ttl(keys.stream) <= 3600
    assert client.ttl(keys.meta) > 86_400


async def test_1000_concurrent_publishes_are_batched_stored_and_delivered_once(
    redis_url: str,
) -> None:
    channels = [f"load.c{i}" for i in range(10)]
    with trio.fail_after(60):
        async with node(redis_url) as (broker, received):
            results: dict[str, list[str]] = {channel: [] for channel in channels}

            async def publish(i: int) -> None:
                channel = channels[i % len(channels)]
                published = await broker.publish(
                    "acme", channel, f"{i}", sender="s", key=f"key-{i}", retention=LONG
                )
                assert not published.duplicate
                results[channel].append(published.event.id)

            async with trio.open_nursery() as nursery:
                for i in range(1000):
                    nursery.start_soon(publish, i)

            await received.wait_until(lambda: len(received.items) >= 1000, 30)
            await trio.sleep(0.2)  # anything doubled would arrive by now
            assert len(received.items) == 1000
            for channel in channels:
                acked = sorted(results[channel], key=parse_id)
                assert len(set(acked)) == 100
                page = await broker.read_after("acme", channel, "0", 1000, LONG)
                stored = [event.id for event in page.events]
                assert stored == acked
                delivered = received.ids("acme", channel)
                assert delivered == stored  # once each, in id order
            batches = broker.statistics().batches
            assert batches.batches < batches.calls, "nothing was batched"


async def test_two_nodes_share_one_redis(redis_url: str) -> None:
    with trio.fail_after(20):
        async with node(redis_url) as (a, seen_by_a), node(redis_url) as (b, seen_by_b):
            on_a = [
                (await a.publish("acme", "room", str(i), sender="x", key=None, retention=LONG))
                for i in range(5)
            ]
            on_b = await b.publish("acme", "room", "5", sender="y", key=None, retention=LONG)
            expected = [p.event for p in on_a] + [on_b.event]
            for seen in (seen_by_a, seen_by_b):
                await seen.wait_until(lambda seen=seen: len(seen.items) >= 6)
                assert [event for _, _, event in seen.items] == expected
            # a duplicate is recognised across nodes
            first = await a.publish("acme", "room", "1", sender="x", key="k", retention=LONG)
            second = await b.publish("acme", "room", "2", sender="y", key="k", retention=LONG)
            assert second.duplicate and second.event == first.event


# -- the key layout ------------------------------------------------------------------

CRAFTED_CHANNELS = ["x", "x:k", "x:c:y", "user:alice", "a@b-c", "{b1}", "*", "k", "c"]
CRAFTED_KEYS = ["k:y", "y", "{b1}", "*", "a:b:c", "}{", "%3A", "a b"]
ORG_KEY = re.compile(
    rf"^{PREFIX}:\{{b(?P<shard>[0-9]+)\.[0-9]+\}}:(?P<org>[^:]*):(?P<kind>[cmk]):"
    r"(?P<channel>[A-Za-z0-9_.@%-]+)(:(?P<key>[A-Za-z0-9_.@%-]+))?$"
)
SHARED_KEY = re.compile(rf"^{PREFIX}:\{{b[0-9]+\.[0-9]+\}}:bus(:seq)?$")


async def test_crafted_names_stay_inside_their_org(redis_url: str) -> None:
    layout = KeyLayout(PREFIX, 16)
    client = inspector(redis_url)
    with trio.fail_after(30):
        async with node(redis_url) as (broker, _):
            for channel in CRAFTED_CHANNELS:
                await broker.publish("b", channel, '"b"', sender="b", key="kb", retention=LONG)
            b_before = {key: client.dump(key) for key in client.scan_iter(layout.org_pattern("b"))}
            assert len(b_before) == 3 * len(CRAFTED_CHANNELS)

            published = {}
            for channel in CRAFTED_CHANNELS:
                for key in CRAFTED_KEYS:
                    result = await broker.publish(
                        "a", channel, f'"{channel} {key}"', sender="a", key=key, retention=LONG
                    )
                    # "x" + key "k:y" and "x:k" + key "y" must not collide
                    assert not result.duplicate, (channel, key)
                    published[channel, key] = result.event
            for channel in CRAFTED_CHANNELS:
                page = await broker.read_after("a", channel, "0", 100, LONG)
                assert [e.data for e in page.events] == [
                    f'"{channel} {key}"' for key in CRAFTED_KEYS
                ]
                again = await broker.publish(
                    "a", channel, "0", sender="a", key="a:b:c", retention=LONG
                )
                assert again.event == published[channel, "a:b:c"]

    a_keys = set()
    for key in client.scan_iter(f"{PREFIX}:*"):
        if SHARED_KEY.match(key):
            continue
        match = ORG_KEY.match(key)
        assert match is not None, key
        assert match["org"] in ("a", "b"), key
        assert (match["kind"] == "k") == (match["key"] is not None), key
        if match["org"] == "a":
            a_keys.add(key)
            channel = next(c for c in CRAFTED_CHANNELS if escape(c) == match["channel"])
            assert int(match["shard"]) == layout.shard_of("a", channel), key
            assert ":a:" in key
    assert len(a_keys) == len(CRAFTED_CHANNELS) * (2 + len(CRAFTED_KEYS))
    b_after = {key: client.dump(key) for key in client.scan_iter(layout.org_pattern("b"))}
    assert b_after == b_before


# -- failures ------------------------------------------------------------------------


async def test_kill_9_and_restart_loses_and_doubles_nothing(
    redis_server_factory: RedisServerFactory,
) -> None:
    server = redis_server_factory(appendonly=True)
    channels = ["c0", "c1", "c2"]
    acked: dict[str, list[str]] = {channel: [] for channel in channels}
    failures: list[float] = []
    stop = trio.Event()

    async def publisher(channel: str) -> None:
        while not stop.is_set():
            started = trio.current_time()
            try:
                published = await broker.publish(
                    "acme", channel, "1", sender="s", key=None, retention=LONG
                )
            except BrokerUnavailable:
                failures.append(trio.current_time() - started)
                await trio.sleep(0.05)
            else:
                acked[channel].append(published.event.id)

    def total() -> int:
        return sum(len(ids) for ids in acked.values())

    with trio.fail_after(60):
        async with node(server.url, operation_timeout=TIMEOUT) as (broker, received):
            async with trio.open_nursery() as nursery:
                for channel in channels:
                    nursery.start_soon(publisher, channel)
                await wait_for(lambda: total() >= 300, 20)
                server.kill()
                await wait_for(lambda: len(failures) >= 3, 10)
                assert not broker.ready
                before_restart = total()
                server.start()  # same port and directory: the AOF comes back
                await wait_for(lambda: total() >= before_restart + 300, 20)
                stop.set()

            assert max(failures) <= TIMEOUT + SLACK
            await wait_for(lambda: broker.ready, 10)
            for channel in channels:
                page = await broker.read_after("acme", channel, "0", 100_000, LONG)
                stored = [event.id for event in page.events]
                assert set(acked[channel]) <= set(stored), "an acknowledged publish was lost"
                await received.wait_until(
                    lambda channel=channel, stored=stored: (
                        len(received.ids("acme", channel)) >= len(stored)
                    )
                )
            await trio.sleep(0.2)
            for channel in channels:
                stored = [
                    event.id
                    for event in (
                        await broker.read_after("acme", channel, "0", 100_000, LONG)
                    ).events
                ]
                delivered = received.ids("acme", channel)
                assert delivered == stored, "fan-out lost or doubled events"
                assert strictly_increasing(delivered)
            stats = broker.statistics().bus
            assert (stats.gaps, stats.resets) == (0, 0)


async def test_sigstop_gives_unavailable_within_the_timeout(redis_server: RedisServer) -> None:
    with trio.fail_after(30):
        async with node(redis_server.url, operation_timeout=TIMEOUT) as (broker, received):
            await broker.publish("acme", "c", "0", sender="s", key=None, retention=LONG)
            redis_server.pause()
            try:
                for call in (
                    broker.publish("acme", "c", "1", sender="s", key=None, retention=LONG),
                    broker.read_after("acme", "c", "0", 10, LONG),
                    broker.position("acme", "c"),
                ):
                    started = trio.current_time()
                    with pytest.raises(BrokerUnavailable):
                        await call
                    assert trio.current_time() - started <= TIMEOUT + SLACK
                await wait_for(lambda: not broker.ready, 2 * TIMEOUT + 2)
            finally:
                redis_server.resume()
            await wait_for(lambda: broker.ready, 10)
            last = await broker.publish("acme", "c", "2", sender="s", key=None, retention=LONG)
            await received.wait_until(lambda: last.event in [e for _, _, e in received.items])
            delivered = received.ids("acme", "c")
            assert strictly_increasing(delivered)
            stored = await broker.read_after("acme", "c", "0", 100, LONG)
            assert delivered == [event.id for event in stored.events]


async def test_ready_follows_redis_and_startup_without_redis(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)  # not started yet
    try:
        with trio.fail_after(30):
            async with node(server.url, operation_timeout=TIMEOUT) as (broker, received):
                assert not broker.ready
                started = trio.current_time()
                with pytest.raises(BrokerUnavailable):
                    await broker.publish("acme", "c", "1", sender="s", key=None, retention=LONG)
                assert trio.current_time() - started <= TIMEOUT + SLACK
                server.start()
                await wait_for(lambda: broker.ready, 10)
                published = await broker.publish(
                    "acme", "c", "1", sender="s", key=None, retention=LONG
                )
                await received.wait_until(lambda: len(received.items) == 1)
                assert received.items[0][2] == published.event

                server.kill()
                await wait_for(lambda: not broker.ready, 2 * TIMEOUT + 2)
                server.start()
                await wait_for(lambda: broker.ready, 10)
    finally:
        server.stop()


async def test_reads_wait_until_the_bus_reader_knows_where_it_starts(tmp_path: Path) -> None:
    """A node started while Redis was unreachable has a bus reader that does
    not know where it starts. A subscription's replay read then could end
    before that start, and the events in between would reach the client
    neither by replay nor live (the fault campaign's Sentinel run: a node
    restarted while no master was named). Reads are refused until the reader
    knows; then a read covers everything up to where live delivery begins."""
    server = RedisServer(tmp_path)  # not started yet
    slow_reader = RedisTuning(backoff_base=3.0, backoff_cap=3.0)  # its retry comes late
    try:
        with trio.fail_after(30):
            async with node(server.url, slow_reader, operation_timeout=TIMEOUT) as (
                broker,
                received,
            ):
                assert not broker.bus.positioned
                server.start()
                early = await broker.publish("acme", "c", "1", sender="s", key=None, retention=LONG)
                with pytest.raises(BrokerUnavailable, match="where the bus ends"):
                    await broker.read_after("acme", "c", "0", 100, LONG)
                with pytest.raises(BrokerUnavailable, match="where the bus ends"):
                    await broker.position("acme", "c")
                await wait_for(lambda: broker.bus.positioned, 10)
                page = await broker.read_after("acme", "c", "0", 100, LONG)
                assert [event.id for event in page.events] == [early.event.id]
                late = await broker.publish("acme", "c", "2", sender="s", key=None, retention=LONG)
                await received.wait_until(lambda: len(received.items) == 1)
                assert received.items[0][2] == late.event  # live from where reads left off
    finally:
        server.stop()


async def test_flushall_makes_old_positions_unrecovered(redis_url: str) -> None:
    client = inspector(redis_url)
    with trio.fail_after(20):
        async with node(redis_url) as (broker, received):
            old = [
                (await broker.publish("acme", "c", str(i), sender="s", key=None, retention=LONG))
                for i in range(3)
            ]
            assert (await broker.read_after("acme", "c", old[0].event.id, 10, LONG)).recovered
            await received.wait_until(lambda: len(received.items) == 3)

            client.flushall()
            page = await broker.read_after("acme", "c", old[0].event.id, 10, LONG)
            assert (page.events, page.position, page.recovered) == ((), "0-0", False)

            new = await broker.publish("acme", "c", "new", sender="s", key=None, retention=LONG)
            page = await broker.read_after("acme", "c", old[-1].event.id, 10, LONG)
            assert (page.events, page.recovered) == ((new.event,), False)
            # the new bus shard starts a new sequence: noticed, and still delivered
            await received.wait_until(lambda: len(received.items) == 4)
            assert received.items[-1][2] == new.event
            assert broker.statistics().bus.resets == 1


async def test_a_trimmed_bus_is_detected_not_skipped_silently(redis_url: str) -> None:
    layout = KeyLayout(PREFIX, 16)
    keys = layout.channel("acme", "c")
    client = inspector(redis_url)
    with trio.fail_after(20):
        async with node(redis_url) as (broker, received):
            first = await broker.publish("acme", "c", "0", sender="s", key=None, retention=LONG)
            await received.wait_until(lambda: len(received.items) == 1)
            # Three publishes and a trim in one transaction: the blocked reader
            # can only see the state after it, as if it had fallen behind.
            with client.pipeline(transaction=True) as pipe:
                for i in range(3):
                    pipe.evalsha(
                        PUBLISH.sha, 4, keys.stream, keys.meta, keys.bus, keys.bus_seq,
                        "acme", "c", str(i), "s", "", 100, 60_000, 100_000_000, 0, 10_000,
                    )  # fmt: skip
                pipe.xtrim(keys.bus, maxlen=0)
                pipe.execute()
            last = await broker.publish("acme", "c", "4", sender="s", key=None, retention=LONG)
            await received.wait_until(lambda: len(received.items) == 2)
            assert [e for _, _, e in received.items] == [first.event, last.event]
            stats = broker.statistics().bus
            assert (stats.gaps, stats.lost) == (1, 3)
            # the channel stream still has what the bus lost
            page = await broker.read_after("acme", "c", first.event.id, 10, LONG)
            assert len(page.events) == 4 and page.recovered


async def test_reader_resumes_after_its_connection_is_killed(redis_url: str) -> None:
    client = inspector(redis_url)
    with trio.fail_after(30):
        async with node(redis_url) as (broker, received), node(redis_url) as (other, _):
            ids = []
            for round_ in range(3):
                for i in range(30):
                    published = await other.publish(
                        "acme", "c", f"{round_}.{i}", sender="s", key=None, retention=LONG
                    )
                    ids.append(published.event.id)
                client.client_kill_filter(_type="normal", skipme=True)
            await received.wait_until(lambda: len(received.items) >= 90)
            await trio.sleep(0.2)
            assert received.ids("acme", "c") == ids
            assert broker.statistics().bus.failures >= 1


async def test_publish_waits_for_replicas(redis_server_factory: RedisServerFactory) -> None:
    primary = redis_server_factory(args=("--repl-diskless-sync-delay", "0"))
    replica = redis_server_factory(args=("--replicaof", "127.0.0.1", str(primary.port)))
    wait_for_replica_online(primary)
    with trio.fail_after(30):
        async with node(primary.url, operation_timeout=TIMEOUT, publish_wait_replicas=1) as (
            broker,
            _,
        ):
            published = await broker.publish("acme", "c", "1", sender="s", key=None, retention=LONG)
            keys = KeyLayout(PREFIX, 16).channel("acme", "c")
            assert inspector(replica.url).xlen(keys.stream) == 1
            # reads never wait
            assert (await broker.read_latest("acme", "c", 1, LONG)).events == (published.event,)

            replica.pause()
            try:
                started = trio.current_time()
                with pytest.raises(BrokerUnavailable, match="replicas"):
                    await broker.publish("acme", "c", "2", sender="s", key=None, retention=LONG)
                assert trio.current_time() - started <= TIMEOUT + SLACK
            finally:
                replica.resume()
        async with node(primary.url, operation_timeout=TIMEOUT, publish_wait_replicas=2) as (
            broker,
            _,
        ):
            with pytest.raises(BrokerUnavailable, match="1 of 2 replicas"):
                await broker.publish("acme", "c", "3", sender="s", key=None, retention=LONG)


async def test_scripts_are_reloaded_after_script_flush(redis_url: str) -> None:
    with trio.fail_after(15):
        async with node(redis_url) as (broker, _):
            await broker.publish("acme", "c", "1", sender="s", key=None, retention=LONG)
            inspector(redis_url).script_flush()
            second = await broker.publish("acme", "c", "2", sender="s", key=None, retention=LONG)
            page = await broker.read_after("acme", "c", "0", 10, LONG)
            assert page.events[-1] == second.event and len(page.events) == 2


async def test_unencodable_text_fails_alone(redis_url: str) -> None:
    with trio.fail_after(15):
        async with node(redis_url) as (broker, _):
            with pytest.raises(UnicodeEncodeError):
                await broker.publish("acme", "c", '"\ud800"', sender="s", key=None, retention=LONG)
            ok = await broker.publish("acme", "c", '"ok"', sender="s", key=None, retention=LONG)
            assert (await broker.read_latest("acme", "c", 5, LONG)).events == (ok.event,)


async def test_closing_while_redis_hangs_is_bounded(redis_server: RedisServer) -> None:
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            async with node(redis_server.url, operation_timeout=TIMEOUT) as (broker, _):
                await broker.publish("acme", "c", "0", sender="s", key=None, retention=LONG)
                redis_server.pause()
                outcomes: list[str] = []

                async def publish() -> None:
                    try:
                        await broker.publish("acme", "c", "1", sender="s", key=None, retention=LONG)
                    except BrokerUnavailable:
                        outcomes.append("unavailable")

                for _ in range(20):
                    nursery.start_soon(publish)
                await trio.sleep(0.1)  # the calls are in flight or queued
                closing = trio.current_time()
            assert trio.current_time() - closing <= TIMEOUT + 2.5
        redis_server.resume()
        assert outcomes == ["unavailable"] * 20


async def test_calls_after_close_are_unavailable(redis_url: str) -> None:
    with trio.fail_after(15):
        async with node(redis_url) as (broker, _):
            pass
        with pytest.raises(BrokerUnavailable, match="closed"):
            await broker.publish("acme", "c", "1", sender="s", key=None, retention=LONG)


async def test_a_failing_listener_does_not_stop_fan_out(redis_url: str) -> None:
    seen: list[str] = []

    def listener(org: str, channel: str, event: Event) -> None:
        seen.append(event.data)
        if event.data == '"boom"':
            raise RuntimeError("listener bug")

    with trio.fail_after(15):
        async with open_redis_broker(settings(redis_url)) as broker:
            broker.set_listener(listener)
            for data in ('"a"', '"boom"', '"b"'):
                await broker.publish("acme", "c", data, sender="s", key=None, retention=LONG)
            await wait_for(lambda: len(seen) == 3, 5)
            assert seen == ['"a"', '"boom"', '"b"']
