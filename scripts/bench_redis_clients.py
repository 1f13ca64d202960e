#!/usr/bin/env python3
"""Benchmark: Redis clients for the broker, under the batcher's access pattern.

Starts its own throwaway redis-server (no persistence, pinned to the second
CPU when there are two; this process on the first) and runs the broker's
real PUBLISH script (EVALSHA, the keys and arguments `RedisBroker.publish`
sends, 50 channels, 100-byte payload) through each candidate:

- `own`: apix-trio's trio-native RESP client (`broker/redis/resp.py`:
  trio socket, hiredis' C parser) and the pipeline on it (`ScriptBatcher`);
- `redis-py`: redis-py's asyncio client under trio-asyncio (what the broker
  used before), commands packed once and written with
  `send_packed_command`, replies read with `read_response`, one
  trio->asyncio crossing per batch, as the old `ScriptBatcher` did;
- `coredis` (when installed): coredis on trio through anyio, its own
  non-transactional pipeline and its own per-command calls.

Two patterns, each for `--seconds`:

1. `pipelined x100`: one task writes 100 calls at once and reads the 100
   replies, repeatedly (the cost of the client itself per command);
2. `100 tasks`: 100 trio tasks each calling and awaiting one script call at
   a time, repeatedly, through a batching front (the broker's real
   `ScriptBatcher` for `own`; for the others the old batcher's shape: a
   queue and 4 workers that each take whatever is queued and run it as one
   pipeline); for coredis also each task calling `evalsha` directly.

Reported per run: calls/s, this process' CPU (1.0 = a core) and its CPU per
call. Bounded: every run stops after `--seconds`; loopback only.

    python scripts/bench_redis_clients.py [--seconds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import trio  # noqa: E402
from benchlib import throwaway_redis  # noqa: E402

from apix_trio.broker.redis.keys import KeyLayout  # noqa: E402
from apix_trio.broker.redis.scripts import PUBLISH  # noqa: E402
from apix_trio.broker.redis.support import pack_command  # noqa: E402

CHANNELS = 50
DATA = b'{"bt":0,"p":"' + b"x" * 100 + b'"}'
DEPTH = 100
TASKS = 100
WORKERS = 4


def publish_args(n: int, layout: KeyLayout) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """Keys and arguments of RedisBroker.publish for event n."""
    channel = f"bench.c{n % CHANNELS}"
    keys = layout.channel("bench", channel)
    names = tuple(k.encode() for k in (keys.stream, keys.meta, keys.bus, keys.bus_seq))
    args = (
        b"bench", channel.encode(), DATA, b"bench", b"",
        b"100", b"3600000", b"90000000", b"0", b"10000",
    )  # fmt: skip
    return names, args


def packed(n: int, layout: KeyLayout) -> bytes:
    keys, args = publish_args(n, layout)
    return pack_command(b"EVALSHA", PUBLISH.sha_bytes, b"%d" % len(keys), *keys, *args)


async def timed(seconds: float, step: Callable[[], Awaitable[int]]) -> dict[str, float]:
    """Run `step` (returns calls done) until `seconds` pass."""
    done = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while time.perf_counter() - wall0 < seconds:
        done += await step()
    return summary(done, cpu0, wall0)


def summary(done: int, cpu0: float, wall0: float) -> dict[str, float]:
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "calls_per_s": round(done / wall),
        "client_cpu": round(cpu / wall, 3),
        "client_us_per_call": round(1e6 * cpu / max(1, done), 2),
    }


async def many_tasks(seconds: float, call: Callable[[int], Awaitable[Any]]) -> dict[str, float]:
    """TASKS tasks, each calling `call(n)` one at a time until `seconds` pass."""
    done = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    deadline = wall0 + seconds

    async def worker(first: int) -> None:
        nonlocal done
        n = first
        while time.perf_counter() < deadline:
            await call(n)
            done += 1
            n += TASKS

    async with trio.open_nursery() as nursery:
        for i in range(TASKS):
            nursery.start_soon(worker, i)
    return summary(done, cpu0, wall0)


class OldBatcher:
    """The old ScriptBatcher's shape: a queue, WORKERS workers, each running
    whatever is queued as one pipeline through `exchange(commands)`."""

    def __init__(self, exchange: Callable[[list[Any]], Awaitable[list[Any]]]) -> None:
        self.exchange = exchange
        self.send, self.receive = trio.open_memory_channel[tuple[Any, list[Any], trio.Event]](
            16384
        )

    async def call(self, command: Any) -> Any:
        box: list[Any] = []
        done = trio.Event()
        await self.send.send((command, box, done))
        await done.wait()
        return box[0]

    async def worker(self) -> None:
        while True:
            batch = [await self.receive.receive()]
            while len(batch) < 512:
                try:
                    batch.append(self.receive.receive_nowait())
                except trio.WouldBlock:
                    break
            replies = await self.exchange([command for command, _, _ in batch])
            for (_, box, done), reply in zip(batch, replies, strict=True):
                box.append(reply)
                done.set()


Exchange = Callable[[list[Any]], Awaitable[list[Any]]]


async def with_old_batcher(
    seconds: float, exchange: Exchange, make: Callable[[int], Any]
) -> dict[str, float]:
    batcher = OldBatcher(exchange)
    async with trio.open_nursery() as nursery:
        for _ in range(WORKERS):
            nursery.start_soon(batcher.worker)
        result = await many_tasks(seconds, lambda n: batcher.call(make(n)))
        nursery.cancel_scope.cancel()
    return result


# -- the candidates ------------------------------------------------------------------


async def bench_own(url: str, seconds: float, layout: KeyLayout) -> dict[str, Any]:
    from apix_trio.broker.redis.batch import ScriptBatcher
    from apix_trio.broker.redis.resp import open_connection, parse_url
    from apix_trio.broker.redis.support import RedisTuning

    connection = await open_connection(parse_url(url))
    commands = [packed(n, layout) for n in range(DEPTH * CHANNELS)]
    counter = 0

    async def pipelined() -> int:
        nonlocal counter
        start = (counter % CHANNELS) * DEPTH
        counter += 1
        await connection.send(b"".join(commands[start : start + DEPTH]))
        for _ in range(DEPTH):
            await connection.read_reply()
        return DEPTH

    out: dict[str, Any] = {"pipelined x100": await timed(seconds, pipelined)}
    await connection.aclose()
    batcher = ScriptBatcher(url, 4.0, 0, RedisTuning())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.serve)
        call_args = [publish_args(n, layout) for n in range(CHANNELS)]

        def call(n: int) -> Awaitable[Any]:
            keys, args = call_args[n % CHANNELS]
            return batcher.call(PUBLISH, keys, args, write=True)

        run = await many_tasks(seconds, call)
        stats = batcher.statistics()
        out["100 tasks, ScriptBatcher"] = {
            **run, "mean_batch": round(stats.calls / max(1, stats.batches), 1)
        }
        batcher.close()
        nursery.cancel_scope.cancel()
    return out


async def bench_redis_py(url: str, seconds: float, layout: KeyLayout) -> dict[str, Any]:
    import math

    import redis.asyncio as aioredis
    import trio_asyncio

    async with trio_asyncio.open_loop():
        pool = aioredis.ConnectionPool.from_url(url, max_connections=WORKERS + 1, protocol=2)
        connections: list[Any] = []

        async def exchange(commands: list[bytes]) -> list[Any]:
            connection = connections.pop() if connections else await pool.get_connection()
            await connection.send_packed_command(commands, check_health=False)
            replies = [await connection.read_response(timeout=math.inf) for _ in commands]
            connections.append(connection)
            return replies

        crossing = trio_asyncio.aio_as_trio(exchange)
        commands = [packed(n, layout) for n in range(DEPTH * CHANNELS)]
        counter = 0

        async def pipelined() -> int:
            nonlocal counter
            start = (counter % CHANNELS) * DEPTH
            counter += 1
            await crossing(commands[start : start + DEPTH])
            return DEPTH

        out: dict[str, Any] = {"pipelined x100": await timed(seconds, pipelined)}
        out["100 tasks, old batcher (4 workers)"] = await with_old_batcher(
            seconds, crossing, lambda n: commands[n % len(commands)]
        )
        for connection in connections:
            await trio_asyncio.aio_as_trio(connection.disconnect)()
        await trio_asyncio.aio_as_trio(pool.aclose)()
    return out


async def bench_coredis(url: str, seconds: float, layout: KeyLayout) -> dict[str, Any]:
    import coredis

    port = int(url.rsplit(":", 1)[1].split("/")[0])
    client = coredis.Redis(host="127.0.0.1", port=port, decode_responses=True)
    sha = PUBLISH.sha
    args = [publish_args(n, layout) for n in range(CHANNELS)]
    out: dict[str, Any] = {}
    async with client:

        async def run_pipeline(calls: list[tuple[tuple[bytes, ...], ...]]) -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                pending = [pipe.evalsha(sha, list(keys), list(values)) for keys, values in calls]
            return [await reply for reply in pending]

        counter = 0

        async def pipelined() -> int:
            nonlocal counter
            counter += 1
            await run_pipeline([args[(counter + i) % CHANNELS] for i in range(DEPTH)])
            return DEPTH

        out["pipelined x100"] = await timed(seconds, pipelined)

        async def direct(n: int) -> Any:
            keys, values = args[n % CHANNELS]
            return await client.evalsha(sha, list(keys), list(values))

        out["100 tasks, evalsha each"] = await many_tasks(seconds, direct)
        out["100 tasks, old batcher (4 workers)"] = await with_old_batcher(
            seconds, run_pipeline, lambda n: args[n % CHANNELS]
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", choices=("own", "redis-py", "coredis"), action="append")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    results: dict[str, Any] = {"loadavg": os.getloadavg(), "cpus": len(cpus)}
    with throwaway_redis(cpu=cpus[1] if len(cpus) >= 2 else None) as (url, _):
        if len(cpus) >= 2:
            os.sched_setaffinity(0, {cpus[0]})
        layout = KeyLayout("apixbench", 16)
        import redis as sync_redis

        sync_redis.Redis.from_url(url).script_load(PUBLISH.source)
        candidates: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
            "own": bench_own,
            "redis-py": bench_redis_py,
            "coredis": bench_coredis,
        }
        for name, bench in candidates.items():
            if args.only and name not in args.only:
                continue
            try:
                results[name] = trio.run(bench, url, args.seconds, layout)
            except ImportError as exc:
                results[name] = {"skipped": f"not installed: {exc}"}
            print(name, json.dumps(results[name], indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
