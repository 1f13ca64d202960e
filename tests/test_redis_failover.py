"""A Redis master dies under load: Redis Cluster and Sentinel, real processes.

Two `apix-trio serve` nodes (`publish_wait_replicas = 1`,
`operation_timeout = 2`) share the deployment; publishers on both nodes
publish in a loop (each with an idempotency key), a subscriber on node A is
subscribed to every channel. Then the master holding the channels is
SIGKILLed:

- every publish is answered within the bound (`operation_timeout` + slack):
  `ok`, or `unavailable` while the master is gone;
- after the replica took over (and the old master came back as its
  replica, so that WAIT 1 can be satisfied again) publishes succeed again;
- nothing acknowledged is lost: every acked id is in the history read on
  node B afterwards, and the subscriber received every acked event live;
- Sentinel: node A's readiness turns 503 while the master is gone and 200
  again after the failover.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from apix_trio.broker.redis.keys import KeyLayout
from tests.memws import MemClient
from tests.procs import NodeProcess, open_node
from tests.redis_topologies import SENTINEL_MASTER, RedisClusterSetup, RedisSentinelSetup, command

pytestmark = pytest.mark.timeout(240)

TIMEOUT = 2.0
REPLY_BOUND = TIMEOUT + 1.5
"""Seconds a publish may take to be answered (operation_timeout + slack for a
shared, busy machine)."""
TEST_BOUND = 150.0
SETTINGS: dict[str, object] = {
    "broker.publish_wait_replicas": 1,
    "broker.operation_timeout": TIMEOUT,
    "defaults.history_size": 100_000,
    "limits.ops_per_second": 1_000_000,
}


@attrs.define
class Load:
    """What the publishers and the subscriber saw."""

    acked: dict[str, list[str]] = attrs.Factory(dict)
    """channel -> ids acknowledged"""
    unavailable: int = 0
    ok_after_outage: int = 0
    slowest: float = 0.0
    seen: dict[str, list[str]] = attrs.Factory(dict)
    outage: bool = False
    stop: bool = False


async def publisher(client: MemClient, name: str, channels: list[str], load: Load) -> None:
    n = 0
    while not load.stop:
        channel = channels[n % len(channels)]
        started = trio.current_time()
        reply = await client.call("publish", channel=channel, data={"n": n}, key=f"{name}-{n}")
        took = trio.current_time() - started
        load.slowest = max(load.slowest, took)
        assert took <= REPLY_BOUND, (reply, took)
        if reply["ok"]:
            load.acked.setdefault(channel, []).append(reply["result"]["id"])
            if load.outage:
                load.ok_after_outage += 1
            n += 1  # an unavailable publish is retried with its key
        else:
            assert reply["error"]["code"] == "unavailable", reply
            load.unavailable += 1
            await trio.sleep(0.05)


async def subscriber(client: MemClient, load: Load) -> None:
    while True:
        frame = await client.recv()
        assert frame is not None, f"subscriber closed with {client.close_code}"
        if frame.get("push") == "event":
            load.seen.setdefault(frame["channel"], []).append(frame["event"]["id"])


async def run_failover(
    a: NodeProcess,
    b: NodeProcess,
    channels: list[str],
    kill: Callable[[], Awaitable[None]],
    recover: Callable[[], Awaitable[None]],
) -> Load:
    """The scenario of the module docstring; returns what was seen."""
    load = Load()
    # as behind a load balancer: load only once both nodes say ready (the bus
    # readers wait for an in-sync replica, which a fresh cluster needs a moment for)
    for node in (a, b):
        await until_async(lambda node=node: node.http_get("/api/v1/ready"), 200)
    reader = await a.connect(sub="reader")
    for channel in channels:
        assert (await reader.call("subscribe", channel=channel))["ok"]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(subscriber, reader, load)
        for node, name in ((a, "pa"), (b, "pb")):
            client = await node.connect(sub=name)
            nursery.start_soon(publisher, client, name, channels, load)
        await trio.sleep(1.0)  # load before the kill
        assert sum(map(len, load.acked.values())) > 0
        await kill()
        load.outage = True
        await recover()
        await until(lambda: load.ok_after_outage >= 50)
        load.stop = True
        await trio.sleep(REPLY_BOUND)  # the publishers' last calls are answered
        total = sum(map(len, load.acked.values()))
        await until(lambda: sum(map(len, load.seen.values())) >= total)  # every acked event
        nursery.cancel_scope.cancel()

    historian = await b.connect(sub="historian")
    for channel in channels:
        history = await full_history(historian, channel)
        stored = [event["id"] for event in history]
        missing = set(load.acked.get(channel, ())) - set(stored)
        assert not missing, f"{channel}: acknowledged but lost: {sorted(missing)[:5]}"
        live = load.seen.get(channel, [])
        assert not set(load.acked.get(channel, ())) - set(live), channel
        assert live == sorted(set(live), key=_id_key), f"{channel}: not in order or doubled"
    return load


async def until(predicate: Callable[[], bool]) -> None:
    """Poll `predicate` every 0.1 s (bounded by the test's `fail_after`)."""
    for _ in range(int(TEST_BOUND / 0.1)):
        if predicate():
            return
        await trio.sleep(0.1)
    raise AssertionError("condition never met")


async def until_async(probe: Callable[[], Awaitable[tuple[int, Any]]], status: int) -> None:
    """Poll `probe` every 0.1 s until it answers `status` (bounded like `until`)."""
    for _ in range(int(TEST_BOUND / 0.1)):
        if (await probe())[0] == status:
            return
        await trio.sleep(0.1)
    raise AssertionError(f"never answered {status}")


def _id_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


async def full_history(client: MemClient, channel: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    since = "0"
    for _ in range(100):
        reply = await client.call("history", channel=channel, since=since, limit=1000)
        assert reply["ok"], reply
        events.extend(reply["result"]["events"])
        if len(reply["result"]["events"]) < 1000:
            return events
        since = events[-1]["id"]
    raise AssertionError("history never ended")


async def test_cluster_master_killed_under_load(
    tmp_path: Path, redis_cluster: RedisClusterSetup
) -> None:
    cluster = redis_cluster
    layout = KeyLayout("apix", 16)
    victim = owner(cluster, layout.slot(0))
    shards = [s for s in range(16) if owner(cluster, layout.slot(s)) == victim]
    others = [s for s in range(16) if s not in shards][:2]
    channels = [pick(layout, s) for s in [*shards[:3], *others]]
    settings = {**SETTINGS, "broker.redis_mode": "cluster"}
    key_dir = tmp_path / "keys"
    async with (
        open_node(key_dir, name="a", redis_url=cluster.url, settings=settings) as a,
        open_node(key_dir, name="b", redis_url=cluster.url, settings=settings) as b,
    ):
        with trio.fail_after(TEST_BOUND):

            async def kill() -> None:
                cluster.kill_master(victim)

            async def recover() -> None:
                await trio.to_thread.run_sync(cluster.wait_failover, victim)
                # back as the new master's replica: WAIT 1 can succeed again
                await trio.to_thread.run_sync(cluster.server_on(victim).start)

            load = await run_failover(a, b, channels, kill, recover)
    assert load.unavailable > 0  # the outage was seen, and answered in time
    for node in (a, b):
        assert node.events("redis_cluster_map_changed"), node.name
        assert not node.tracebacks()


async def test_sentinel_master_killed_under_load(
    tmp_path: Path, redis_sentinel: RedisSentinelSetup
) -> None:
    setup = redis_sentinel
    settings = {
        **SETTINGS,
        "broker.redis_mode": "sentinel",
        "broker.sentinel_master": SENTINEL_MASTER,
    }
    channels = ["feed.one", "feed.two", "chat.x"]
    key_dir = tmp_path / "keys"
    readiness: list[int] = []

    async def watch_ready(node: NodeProcess) -> None:
        while True:
            status, _ = await node.http_get("/api/v1/ready")
            if not readiness or readiness[-1] != status:
                readiness.append(status)
            await trio.sleep(0.1)

    async with (
        open_node(key_dir, name="a", redis_url=setup.url, settings=settings) as a,
        open_node(key_dir, name="b", redis_url=setup.url, settings=settings) as b,
    ):
        with trio.fail_after(TEST_BOUND):
            for _ in range(int(TEST_BOUND / 0.1)):
                if (await a.http_get("/api/v1/ready"))[0] == 200:
                    break
                await trio.sleep(0.1)
            old = setup.master_port()
            killed: list[Any] = []

            async def kill() -> None:
                killed.append(setup.kill_master())

            async def recover() -> None:
                await trio.to_thread.run_sync(setup.wait_failover, old)
                await trio.to_thread.run_sync(killed[0].start)  # sentinels make it a replica

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_ready, a)
                load = await run_failover(a, b, channels, kill, recover)
                await until(lambda: readiness[-1] == 200)
                nursery.cancel_scope.cancel()
    assert load.unavailable > 0
    assert readiness[0] == 200 and 503 in readiness and readiness[-1] == 200, readiness
    for node in (a, b):
        assert node.events("redis_master_changed"), node.name
        assert not node.tracebacks()
    assert command(setup.master_port(), "ROLE")[0] == "master"  # type: ignore[index]


def owner(cluster: RedisClusterSetup, slot: int) -> int:
    for entry in command(cluster.master_ports()[0], "CLUSTER", "SLOTS"):  # type: ignore[union-attr]
        if entry[0] <= slot <= entry[1]:
            return int(entry[2][1])
    raise AssertionError(f"nobody serves slot {slot}")


def pick(layout: KeyLayout, shard: int) -> str:
    return next(
        f"room.{n}" for n in range(100_000) if layout.shard_of("acme", f"room.{n}") == shard
    )
