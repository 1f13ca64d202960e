"""Publish throughput of the Redis broker through its batcher.

Starts a throwaway redis-server (no persistence) on a free port, opens the
broker, and runs N concurrent publishers for a few seconds; prints
publishes/s, publish latency, batch sizes, this process's CPU use and how
many events the bus reader delivered (the same process also does fan-out).

    PYTHONPATH=. python scripts/bench_redis_publish.py [--publishers 200] [--seconds 5]
"""

from __future__ import annotations

import argparse
import time

import trio
from benchlib import throwaway_redis

from apix_trio.broker.model import Retention
from apix_trio.broker.redis.events import RedisTuning, open_redis_broker
from apix_trio.settings import BrokerSettings, Settings


async def bench(url: str, publishers: int, seconds: float, workers: int, channels: int) -> None:
    settings = Settings(broker=BrokerSettings(redis_url=url, key_prefix="bench"))
    retention = Retention(history_size=100, history_ttl=60.0, dedupe_window=60.0)
    delivered = 0

    def listener(org: str, channel: str, event: object) -> None:
        nonlocal delivered
        delivered += 1

    async with open_redis_broker(settings, tuning=RedisTuning(batch_workers=workers)) as broker:
        broker.set_listener(listener)
        published = 0
        latencies: list[float] = []
        deadline = trio.current_time() + seconds

        async def publisher(n: int) -> None:
            nonlocal published
            channel = f"bench.c{n % channels}"
            while trio.current_time() < deadline:
                start = time.perf_counter()
                await broker.publish(
                    "bench", channel, '{"x":1}', sender="b", key=None, retention=retention
                )
                latencies.append(time.perf_counter() - start)
                published += 1

        started = time.perf_counter()
        cpu = time.process_time()
        async with trio.open_nursery() as nursery:
            for n in range(publishers):
                nursery.start_soon(publisher, n)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
        await trio.sleep(0.5)
        batches = broker.statistics().batches
        latencies.sort()
        p50 = latencies[len(latencies) // 2] * 1000
        p99 = latencies[int(len(latencies) * 0.99)] * 1000
        print(
            f"publishers={publishers} workers={workers}: {published / elapsed:,.0f} publishes/s, "
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
            f"mean batch {batches.calls / max(batches.batches, 1):.1f}, "
            f"python cpu {cpu / elapsed:.0%}, "
            f"delivered {delivered}/{published}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--publishers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--workers",
        type=int,
        default=RedisTuning().batch_workers,
        help="unanswered batches on the pipeline (RedisTuning.batch_workers)",
    )
    parser.add_argument("--channels", type=int, default=50)
    args = parser.parse_args()
    with throwaway_redis() as (redis_url, _directory):
        trio.run(bench, redis_url, args.publishers, args.seconds, args.workers, args.channels)


if __name__ == "__main__":
    main()
