"""Redis CPU per publish and per bus delivery; publishes/s on 1 and 3 masters.

    python scripts/bench_redis_cluster.py [--seconds 5] [--publishers 200]

For each deployment (one redis-server; a Redis Cluster of 3 masters with one
replica each, from tests/redis_topologies.py) it opens the Redis broker in
this process, runs `--publishers` concurrent publishers on 64 channels for
`--seconds` (bounded), with 1 and then 3 bus readers (brokers whose listener
counts events), and reports:

- publishes/s;
- Redis CPU per publish: the `used_cpu_sys + used_cpu_user` deltas (INFO
  cpu) of every redis-server of the deployment (replicas included) around
  the run with one reader, divided by the publishes;
- Redis CPU per bus delivery: the extra CPU of the run with 3 readers over
  the one with 1, divided by the extra deliveries (2 per publish).

The load generator and the broker share this Python process, so publishes/s
is bounded by Python CPU as much as by Redis (see docs/benchmarks.md).
Loopback only; every server is started here and stopped on exit.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apix_trio.broker.model import BrokerUnavailable, Retention
from apix_trio.broker.redis.events import open_redis_broker
from apix_trio.settings import BrokerSettings, Settings
from tests.conftest import RedisServer
from tests.redis_topologies import RedisClusterSetup, info_field

RETENTION = Retention(history_size=100, history_ttl=600.0, dedupe_window=0.0)
CHANNELS = 64


def redis_cpu(ports: list[int]) -> float:
    return sum(
        float(info_field(port, "cpu", "used_cpu_sys"))
        + float(info_field(port, "cpu", "used_cpu_user"))
        for port in ports
    )


async def run(
    url: str, mode: str, ports: list[int], readers: int, args: argparse.Namespace
) -> dict[str, float]:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    settings = Settings(broker=BrokerSettings(redis_url=url, key_prefix=prefix, redis_mode=mode))
    delivered = [0]

    def count(org: str, channel: str, event: object) -> None:
        delivered[0] += 1

    published = 0
    failed = 0
    async with AsyncExitStack() as stack:
        brokers = []
        for _ in range(readers):
            broker = await stack.enter_async_context(open_redis_broker(settings))
            broker.set_listener(count)
            brokers.append(broker)
        await poll(lambda: all(b.ready for b in brokers), 30.0)
        before = redis_cpu(ports)
        started = time.monotonic()
        stop = trio.current_time() + args.seconds

        async def publisher(n: int) -> None:
            nonlocal published, failed
            channel = f"ch{n % CHANNELS}"
            while trio.current_time() < stop:
                try:
                    await brokers[0].publish(
                        "bench", channel, '{"x":1}', sender="b", key=None, retention=RETENTION
                    )
                    published += 1
                except BrokerUnavailable:
                    failed += 1

        async with trio.open_nursery() as nursery:
            for n in range(args.publishers):
                nursery.start_soon(publisher, n)
        elapsed = time.monotonic() - started
        await poll(lambda: delivered[0] >= published * readers, 10.0)
        cpu = redis_cpu(ports) - before
    return {"published": published, "failed": failed, "rate": published / elapsed,
            "cpu": cpu, "delivered": delivered[0]}  # fmt: skip


async def poll(condition: Callable[[], bool], limit: float) -> None:
    """Until `condition()` or `limit` seconds (bounded either way)."""
    for _ in range(int(limit / 0.05)):
        if condition():
            return
        await trio.sleep(0.05)


def report(name: str, one: dict[str, float], three: dict[str, float]) -> None:
    per_publish = one["cpu"] / max(one["published"], 1) * 1e6
    extra_cpu = three["cpu"] / max(three["published"], 1) - one["cpu"] / max(one["published"], 1)
    per_delivery = extra_cpu / 2 * 1e6
    failed = f"{one['failed']:.0f}+{three['failed']:.0f}"
    print(
        f"{name}: {one['rate']:,.0f} publishes/s (1 reader), {three['rate']:,.0f} (3 readers); "
        f"Redis CPU {per_publish:.0f} us/publish (all servers, 1 reader), "
        f"{per_delivery:.0f} us per extra bus delivery; failed {failed}"
    )


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        single = RedisServer(root / "single", appendonly=False)
        (root / "single").mkdir()
        single.start()
        try:
            one = await run(single.url, "standalone", [single.port], 1, args)
            three = await run(single.url, "standalone", [single.port], 3, args)
            report("1 master (standalone)", one, three)
        finally:
            single.stop()
        cluster = RedisClusterSetup(root / "cluster")
        cluster.start()
        try:
            ports = [server.port for server in cluster.servers]
            one = await run(cluster.url, "cluster", ports, 1, args)
            three = await run(cluster.url, "cluster", ports, 3, args)
            report("3 masters (cluster, 3 replicas)", one, three)
        finally:
            cluster.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--publishers", type=int, default=200)
    trio.run(main, parser.parse_args())
