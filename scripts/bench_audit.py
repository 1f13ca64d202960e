#!/usr/bin/env python3
"""What the audit trail and the per-org latency tracker cost on the publish path.

Not a test. Three measurements, on the embedded broker so that the node's
own CPU is all that is measured:

1. publishes per CPU-second (process CPU time, not wall time: the machine
   is shared, and CPU time is what the audit trail adds) through the real
   WebSocket path (wsproto client over
   in-memory streams -> handshake, connection, op worker, publish handler,
   memory broker, reply), one client pipelining `WINDOW` publishes, with and
   without one extra audit entry recorded per publish (the bench switch:
   the publish handler is wrapped to call `hub.audit.record` each time; the
   writer task stores every entry in the memory trail meanwhile). Runs
   alternate and the median of `ROUNDS` is reported.
2. `AuditTrail.record()` alone: microseconds per call.
3. `LatencyTracker.delivered()` / `.acked()`: microseconds per call.

Usage: `python3 scripts/bench_audit.py [publishes per round]` (default 20000).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apix_trio.commands import dispatch, events
from apix_trio.observability.audit import AuditTrail
from apix_trio.observability.latency import LatencyTracker
from apix_trio.protocol import frames
from tests.memws import memory_hub

ROUNDS = 5
WINDOW = 64
MAX_SECONDS = 120.0


async def publish_rate(total: int, audited: bool) -> float:
    original = events.publish

    async def publish_and_audit(conn, command):  # type: ignore[no-untyped-def]
        result = await original(conn, command)
        conn.hub.audit.record(
            conn.org, "bench.publish", sub=conn.sub, conn=conn.id, ip=conn.peer,
            detail={"channel": command.channel, "id": result["id"]},
        )  # fmt: skip
        return result

    dispatch.HANDLERS[frames.Publish] = publish_and_audit if audited else original
    try:
        with tempfile.TemporaryDirectory() as tmp:
            async with memory_hub(
                Path(tmp), heartbeat={"interval": 1e6}, limits={"ops_per_second": 1e9}
            ) as mem:
                client = await mem.connect()
                assert (await client.call("auth", token=mem.token()))["ok"]
                started = time.process_time()
                sent = 0
                while sent < total:
                    batch = min(WINDOW, total - sent)
                    for n in range(batch):
                        await client.send(
                            {"op": "publish", "id": sent + n + 10, "channel": "bench.a", "data": n}
                        )
                    for _ in range(batch):
                        reply = await client.recv()
                        assert reply is not None and reply["ok"], reply
                    sent += batch
                await mem.hub.audit.flush()  # the writer's work counts too
                await trio.testing.wait_all_tasks_blocked()
                elapsed = time.process_time() - started
                stats = mem.hub.audit.statistics()
                if audited:
                    assert stats.dropped == 0 and stats.written >= total, stats
                return total / elapsed
    finally:
        dispatch.HANDLERS[frames.Publish] = original


def record_cost(calls: int = 200_000) -> float:
    trail = AuditTrail(None, node="bench", wall_clock=time.time, queue_size=calls + 1)
    trail._write = lambda records: None  # type: ignore[assignment,return-value]  # queue only
    started = time.perf_counter()
    for n in range(calls):
        trail.record("acme", "bench.publish", sub="alice", conn="c1", ip="127.0.0.1",
                     detail={"channel": "bench.a", "id": n})  # fmt: skip
    return (time.perf_counter() - started) / calls * 1e6


def latency_cost(calls: int = 500_000) -> tuple[float, float]:
    tracker = LatencyTracker("bench", wall_clock=time.time)
    now_ms = time.time() * 1000
    started = time.perf_counter()
    for n in range(calls):
        tracker.delivered("acme", now_ms - (n % 5000) / 100, now_ms)
    delivered = (time.perf_counter() - started) / calls * 1e6
    started = time.perf_counter()
    for n in range(calls):
        tracker.acked("acme", (n % 5000) / 100)
    acked = (time.perf_counter() - started) / calls * 1e6
    return delivered, acked


async def main(total: int) -> None:
    deadline = time.monotonic() + MAX_SECONDS
    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(ROUNDS):
        for audited in (False, True):
            if time.monotonic() > deadline:
                break
            rates[audited].append(await publish_rate(total, audited))
    plain, audited = statistics.median(rates[False]), statistics.median(rates[True])
    runs = [round(r) for r in rates[False]]
    print(f"publishes per CPU-s without audit: {plain:,.0f}  (runs: {runs})")
    print(f"publishes per CPU-s with an audit entry per publish: {audited:,.0f}  "
          f"(runs: {[round(r) for r in rates[True]]})")  # fmt: skip
    print(f"cost: {100 * (plain - audited) / plain:.1f}% of publish throughput")
    print(f"AuditTrail.record(): {record_cost():.2f} us per call")
    delivered, acked = latency_cost()
    print(f"LatencyTracker.delivered(): {delivered:.2f} us, .acked(): {acked:.2f} us per call")


if __name__ == "__main__":
    import trio.testing

    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)
