"""Consumer groups end to end on Redis: real redis-server, real nodes, real sockets.

Nodes run in-process (`tests/serverkit.running_server`, several per test, all
on one Redis) or, where a node must die, as a real `python -m apix_trio
serve` process killed with SIGKILL. Clients are `tests/wsclient.RawClient`s
(the `websockets` library, in threads). Real clock everywhere, every test
bounded by `trio.fail_after`. After each test, Redis is inspected with
redis-py: no group may keep pending entries and no consumer may hold any.
"""

from __future__ import annotations

import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import trio
from websockets.exceptions import ConnectionClosed

from apix_trio.broker.groups import RELEASED
from apix_trio.broker.model import Retention
from apix_trio.broker.redis.events import open_redis_broker
from apix_trio.broker.redis.keys import KeyLayout
from apix_trio.settings import BrokerSettings, ChannelOptions, Namespace, Settings
from tests.procs import open_node
from tests.serverkit import Kit, running_server
from tests.wsclient import RawClient

pytestmark = pytest.mark.timeout(90)

JOBS = (Namespace("jobs.>", ChannelOptions(history_size=10_000, history_ttl=3600)),)
RETENTION = Retention(history_size=10_000, history_ttl=3600.0)
SLOW_RETRIES = {"retry_base": 30.0, "retry_max": 60.0}


class Halfway(random.Random):
    """Every draw is 0.5: each retry delay is half its ceiling (no early retries)."""

    def random(self) -> float:
        return 0.5


@pytest.fixture
def prefix() -> str:
    return f"gt-{uuid.uuid4().hex[:10]}"


@asynccontextmanager
async def node(
    tmp_path: Path, url: str, prefix: str, name: str, **sections: Any
) -> AsyncIterator[Kit]:
    sections.setdefault("namespaces", JOBS)
    delivery = {"visibility_timeout": 2.0, **sections.pop("delivery", {})}
    async with running_server(
        tmp_path,
        broker={"redis_url": url, "key_prefix": prefix},
        server={"node_id": name},
        delivery=delivery,
        **sections,
    ) as kit:
        kit.hub.rng = Halfway()
        yield kit


async def member(kit: Kit, sub: str, channel: str = "jobs.q", group: str = "w") -> RawClient:
    client = await RawClient.open(kit.url)
    reply = await client.call("auth", token=kit.token("acme", sub))
    assert reply["ok"], reply
    reply = await client.call("subscribe", channel=channel, group=group)
    assert reply["ok"], reply
    return client


async def publish(kit: Kit, n: int, channel: str = "jobs.q") -> list[str]:
    out = []
    for i in range(n):
        published = await kit.hub.broker.publish(
            "acme", channel, f'{{"n":{i}}}', sender="pub", key=None, retention=RETENTION
        )
        out.append(published.event.id)
    return out


async def recv_within(client: RawClient, seconds: float) -> dict[str, Any] | None:
    """The next frame (stashed pushes first), or None when none comes in time."""
    if client.pushes:
        return client.pushes.pop(0)

    def receive() -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = orjson.loads(client.conn.recv(timeout=seconds))
        except TimeoutError:
            return None
        return result

    return await trio.to_thread.run_sync(receive)


async def ack(client: RawClient, ids: list[str], channel: str = "jobs.q") -> int:
    reply = await client.call("ack", channel=channel, group="w", ids=ids)
    assert reply["ok"], reply
    return int(reply["result"]["acked"])


def inspect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)


def stream_key(prefix: str, channel: str = "jobs.q") -> str:
    return KeyLayout(prefix, 16).channel("acme", channel).stream


def group_state(url: str, prefix: str, channel: str = "jobs.q") -> dict[str, Any]:
    r = inspect(url)
    key = stream_key(prefix, channel)
    if not r.exists(key):
        return {"pending": 0, "consumers": {}}
    [info] = [g for g in r.xinfo_groups(key) if g["name"] == "w"]
    consumers = {c["name"]: c["pending"] for c in r.xinfo_consumers(key, "w")}
    return {"pending": info["pending"], "consumers": consumers}


async def eventually(check: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll Redis until `check()` (for server-side work nothing signals)."""
    with trio.fail_after(seconds):
        while True:
            if check():
                return
            await trio.sleep(0.05)


def nothing_stranded(url: str, prefix: str, channel: str = "jobs.q") -> bool:
    """No pending entries and no consumer but (an empty) RELEASED holder."""
    state = group_state(url, prefix, channel)
    return state["pending"] == 0 and set(state["consumers"]) <= {RELEASED}


# -- one node, several members -------------------------------------------------


async def test_three_members_share_the_work_and_nothing_is_doubled(tmp_path, redis_url, prefix):
    total = 300
    async with node(tmp_path, redis_url, prefix, "node-a", delivery=SLOW_RETRIES) as kit:
        with trio.fail_after(60):
            members = [await member(kit, f"m{n}") for n in range(3)]
            seen: list[list[tuple[str, int]]] = [[] for _ in members]
            acked = 0
            all_acked = trio.Event()

            async def consume(client: RawClient, log: list[tuple[str, int]]) -> None:
                nonlocal acked
                while not all_acked.is_set():
                    push = await recv_within(client, 0.2)
                    if push is None:
                        continue
                    assert (push["channel"], push["group"]) == ("jobs.q", "w")
                    log.append((push["event"]["id"], push["attempt"]))
                    count = await ack(client, [push["event"]["id"]])
                    acked += count  # not `acked += await ...`: other tasks add meanwhile
                    if acked == total:
                        all_acked.set()

            async with trio.open_nursery() as nursery:
                for client, log in zip(members, seen, strict=True):
                    nursery.start_soon(consume, client, log)
                published = await publish(kit, total)
                await all_acked.wait()

            first = [event_id for log in seen for event_id, attempt in log if attempt == 1]
            assert sorted(first) == sorted(published)  # each once, to one member
            assert all(len(log) >= total // 10 for log in seen), [len(log) for log in seen]
            assert group_state(redis_url, prefix)["pending"] == 0
            for client in members:
                await client.close()
            await eventually(lambda: nothing_stranded(redis_url, prefix))


async def test_a_released_node_consumer_leaves_no_trace(tmp_path, redis_url, prefix):
    async with node(tmp_path, redis_url, prefix, "node-a") as kit:
        with trio.fail_after(30):
            client = await member(kit, "m")
            [event_id] = await publish(kit, 1)
            assert (await client.next_push())["event"]["id"] == event_id
            state = group_state(redis_url, prefix)
            assert state["pending"] == 1 and list(state["consumers"].values()) == [1]
            [consumer] = state["consumers"]
            assert consumer.startswith("node-a:")
            reply = await client.call("unsubscribe", channel="jobs.q", group="w")
            assert reply["ok"]
            # nobody is left to take it: parked for anybody, the consumer gone
            await eventually(lambda: group_state(redis_url, prefix)["consumers"] == {RELEASED: 1})
            reply = await client.call("subscribe", channel="jobs.q", group="w")
            assert reply["ok"]
            push = await client.next_push()
            assert (push["event"]["id"], push["attempt"]) == (event_id, 2)
            assert await ack(client, [event_id]) == 1
            await client.close()
            await eventually(lambda: nothing_stranded(redis_url, prefix))


# -- several nodes -------------------------------------------------------------


async def test_members_on_two_nodes_share_one_group(tmp_path, redis_url, prefix):
    total = 200
    async with (
        node(tmp_path, redis_url, prefix, "node-a", delivery=SLOW_RETRIES) as a,
        node(tmp_path, redis_url, prefix, "node-b", delivery=SLOW_RETRIES) as b,
    ):
        with trio.fail_after(60):
            members = [await member(a, "on-a"), await member(b, "on-b")]
            seen: list[list[tuple[str, int]]] = [[], []]
            acked = 0
            done = trio.Event()

            async def consume(client: RawClient, log: list[tuple[str, int]]) -> None:
                nonlocal acked
                while not done.is_set():
                    push = await recv_within(client, 0.2)
                    if push is None:
                        continue
                    log.append((push["event"]["id"], push["attempt"]))
                    count = await ack(client, [push["event"]["id"]])
                    acked += count  # not `acked += await ...`: other tasks add meanwhile
                    if acked == total:
                        done.set()

            async with trio.open_nursery() as nursery:
                for client, log in zip(members, seen, strict=True):
                    nursery.start_soon(consume, client, log)
                published = await publish(a, total // 2) + await publish(b, total // 2)
                await done.wait()
            first = [event_id for log in seen for event_id, attempt in log if attempt == 1]
            assert sorted(first) == sorted(published)
            assert all(log for log in seen), "both nodes' members got work"
            for client in members:
                await client.close()
            await eventually(lambda: nothing_stranded(redis_url, prefix))


async def test_a_member_that_disconnects_unacked_hands_over_to_another_node(
    tmp_path, redis_url, prefix
):
    async with (
        node(tmp_path, redis_url, prefix, "node-a", delivery=SLOW_RETRIES) as a,
        node(tmp_path, redis_url, prefix, "node-b", delivery=SLOW_RETRIES) as b,
    ):
        with trio.fail_after(60):
            leaver = await member(a, "leaver")
            ids = await publish(a, 5)
            got = [(await leaver.next_push())["event"]["id"] for _ in ids]
            assert got == ids
            taker = await member(b, "taker")
            assert await recv_within(taker, 1.0) is None  # held by a live member
            closed_at = time.monotonic()
            await leaver.close()
            pushes = [await taker.next_push() for _ in ids]
            handover = time.monotonic() - closed_at
            assert [(p["event"]["id"], p["attempt"]) for p in pushes] == [(i, 2) for i in ids]
            print(f"hand-over to another node took {handover:.3f} s")
            assert handover < 3.0  # within a poll (0.5 s) plus the release
            assert await ack(taker, ids) == 5
            await taker.close()
            await eventually(lambda: nothing_stranded(redis_url, prefix))


async def test_a_node_shutting_down_hands_its_members_events_to_another_node(
    tmp_path, redis_url, prefix
):
    slow = {**SLOW_RETRIES, "visibility_timeout": 60.0}  # so only the release can explain it
    async with node(tmp_path, redis_url, prefix, "node-b", delivery=slow) as b:
        with trio.fail_after(60):
            async with node(tmp_path, redis_url, prefix, "node-a", delivery=slow) as a:
                holder = await member(a, "holder")
                ids = await publish(a, 4)
                assert [(await holder.next_push())["event"]["id"] for _ in ids] == ids
                taker = await member(b, "taker")
                assert await recv_within(taker, 1.0) is None
                a.running.shutdown()
                assert (await holder.wait_closed())[0] == 1001
            # node A has stopped: it released what its member held
            pushes = [await taker.next_push() for _ in ids]
            assert [(p["event"]["id"], p["attempt"]) for p in pushes] == [(i, 2) for i in ids]
            assert await ack(taker, ids) == 4
            await taker.close()
            await eventually(lambda: nothing_stranded(redis_url, prefix))


async def test_a_killed_nodes_unacked_events_go_to_another_node_after_the_visibility_timeout(
    tmp_path, redis_url, prefix
):
    visibility = 2.0
    async with node(tmp_path, redis_url, prefix, "node-b", delivery={**SLOW_RETRIES}) as b:
        async with open_node(
            tmp_path / "keys",
            name="node-dead",
            redis_url=redis_url,
            settings={
                "broker.key_prefix": prefix,
                "delivery.visibility_timeout": "2",
                # its own retries (random: its rng cannot be seeded from here)
                # would come after ~500 s on average; they only shift `attempt`
                "delivery.retry_base": "1000",
                "delivery.retry_max": "1000",
                "delivery.max_attempts": "100",
            },
        ) as dead:
            with trio.fail_after(60):
                doomed = await RawClient.open(dead.ws_url)
                assert (await doomed.call("auth", token=b.token("acme", "doomed")))["ok"]
                reply = await doomed.call("subscribe", channel="jobs.q", group="w")
                assert reply["ok"], reply
                ids = await publish(b, 3)
                got = [(await doomed.next_push())["event"]["id"] for _ in ids]
                assert got == ids
                survivor = await member(b, "survivor")
                # a live node touches what it holds: nothing is taken from it
                assert await recv_within(survivor, 2 * visibility) is None
                killed_at = time.monotonic()
                dead.signal(signal.SIGKILL)
                await dead.process.wait()
                pushes = [await survivor.next_push() for _ in ids]
                waited = time.monotonic() - killed_at
                assert [p["event"]["id"] for p in pushes] == ids
                assert all(p["attempt"] >= 2 for p in pushes)  # 2 unless node-dead retried
                print(f"reclaimed {waited:.2f} s after SIGKILL (visibility timeout {visibility})")
                assert waited < visibility + 3.0
                assert await ack(survivor, ids) == 3
                with pytest.raises((ConnectionClosed, OSError)):
                    await doomed.call("ping")
                # a live reader removes the dead node's consumer once idle and empty
                await eventually(
                    lambda: (
                        not any(
                            name.startswith("node-dead:")
                            for name in group_state(redis_url, prefix)["consumers"]
                        )
                    )
                )
                await survivor.close()
                await eventually(lambda: nothing_stranded(redis_url, prefix))


async def test_dead_letter_after_max_attempts_on_redis(tmp_path, redis_url, prefix):
    delivery = {"retry_base": 0.05, "retry_max": 0.1, "max_attempts": 3}
    async with node(tmp_path, redis_url, prefix, "node-a", delivery=delivery) as kit:
        with trio.fail_after(30):
            watcher = await RawClient.open(kit.url)
            assert (await watcher.call("auth", token=kit.token("acme", "watcher")))["ok"]
            assert (await watcher.call("subscribe", channel="jobs.q.dlq"))["ok"]
            stubborn = await member(kit, "stubborn")
            [event_id] = await publish(kit, 1)
            attempts = [(await stubborn.next_push())["attempt"] for _ in range(3)]
            assert attempts == [1, 2, 3]
            letter = await watcher.next_push()
            assert letter["channel"] == "jobs.q.dlq"
            data = letter["event"]["data"]
            assert (data["group"], data["attempts"], data["event"]["id"]) == ("w", 3, event_id)
            assert data["event"]["data"] == {"n": 0} and data["event"]["from"] == "pub"
            assert letter["event"]["key"] == f"dlq:w:{event_id}"
            # stored like any event of the DLQ channel, and acked on the group
            entries = inspect(redis_url).xrange(stream_key(prefix, "jobs.q.dlq"))
            assert [fields["k"] for _, fields in entries] == [f"dlq:w:{event_id}"]
            # publish first, then ack: the letter may arrive before the ack
            await eventually(lambda: group_state(redis_url, prefix)["pending"] == 0)
            # counted once the ack's reply is back on the node (Redis may show it first)
            dead_letters = "apix_group_dead_letters_total"
            await eventually(lambda: kit.hub.metrics.registry.get_sample_value(dead_letters) == 1)
            await stubborn.close()
            await watcher.close()
            await eventually(lambda: nothing_stranded(redis_url, prefix))


# -- the Redis adapter itself ----------------------------------------------------


async def test_a_group_survives_its_stream_expiring(redis_url, prefix):
    settings = Settings(broker=BrokerSettings(redis_url=redis_url, key_prefix=prefix))
    short = Retention(history_size=100, history_ttl=1.0)
    async with open_redis_broker(settings) as broker:
        g = broker.groups
        with trio.fail_after(20):
            await broker.publish("acme", "jobs.q", "1", sender="p", key=None, retention=short)
            await g.join("acme", "jobs.q", "w")
            await broker.publish("acme", "jobs.q", "2", sender="p", key=None, retention=short)
            [(_, first)] = await g.read_new("acme", "jobs.q", "w", [("n:c", 10)])
            assert first.event.data == "2"
            await g.ack("acme", "jobs.q", "w", [first.event.id])
            # the stream (and its group with it) expires
            await eventually(lambda: not inspect(redis_url).exists(stream_key(prefix)))
            assert await g.read_new("acme", "jobs.q", "w", [("n:c", 10)]) == []
            later = await broker.publish(
                "acme", "jobs.q", "3", sender="p", key=None, retention=short
            )
            got = await g.read_new("acme", "jobs.q", "w", [("n:c", 10)])
            assert [d.event.id for _, d in got] == [later.event.id]


async def test_group_scripts_are_reloaded_after_script_flush(redis_url, prefix):
    settings = Settings(broker=BrokerSettings(redis_url=redis_url, key_prefix=prefix))
    async with open_redis_broker(settings) as broker:
        with trio.fail_after(20):
            await broker.publish("acme", "jobs.q", "1", sender="p", key=None, retention=RETENTION)
            await broker.groups.join("acme", "jobs.q", "w")
            inspect(redis_url).script_flush()
            await broker.publish("acme", "jobs.q", "2", sender="p", key=None, retention=RETENTION)
            got = await broker.groups.read_new("acme", "jobs.q", "w", [("n:c", 10)])
            assert [d.event.data for _, d in got] == ["2"]
