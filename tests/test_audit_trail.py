"""The node's audit writer (apix_trio/observability/audit.py), on a MockClock.

`record()` never blocks or raises; the writer task stores batches; a full
queue, a failing or a stalled store drop entries into the JSON log and the
`apix_audit_dropped_total` counter; details never carry a token.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from apix_trio.broker.audit import AuditQuery, AuditRetention
from apix_trio.broker.memory.audit import MemoryAuditLog
from apix_trio.observability.audit import LINGER, AuditRecord, AuditTrail
from apix_trio.observability.logs import configure_logging

BASE = 1_800_000_000.0
KEEP = AuditRetention()
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"


def wall() -> float:
    return BASE + trio.current_time()


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("debug", "json", stream)
    yield stream
    configure_logging("info", "json")


def log_lines(stream: io.StringIO, event: str) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines() if line]
    return [line for line in lines if line.get("event") == event]


def dropped_metric(registry: CollectorRegistry) -> float:
    value = registry.get_sample_value("apix_audit_dropped_total")
    assert value is not None
    return value


def trail_over(store: MemoryAuditLog, registry: CollectorRegistry, **kw: Any) -> AuditTrail:
    async def write(records: Sequence[AuditRecord]) -> object:
        return await store.append_many(records, KEEP)

    return AuditTrail(write, node="node-7", wall_clock=wall, registry=registry, **kw)


async def test_records_are_written_in_batches_with_node_and_time(autojump_clock: Any) -> None:
    store = MemoryAuditLog(wall_clock=wall)
    registry = CollectorRegistry()
    trail = trail_over(store, registry, batch_size=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(trail.serve)
        await trio.sleep(5)
        trail.record(
            "acme", "auth.ok", sub="alice", conn="c1", ip="10.0.0.9", detail={"via": "auth"}
        )
        for n in range(4):
            trail.record("acme", "rate.limited", sub="bob", detail={"n": n})
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    page = await store.page("acme", AuditQuery(), KEEP)
    first = page.entries[0]
    assert first["type"] == "auth.ok" and first["node"] == "node-7"
    assert first["ts"] == int((BASE + 5) * 1000)
    assert (first["sub"], first["conn"], first["ip"], first["detail"]) == (
        "alice",
        "c1",
        "10.0.0.9",
        {"via": "auth"},
    )
    assert [e["detail"].get("n") for e in page.entries[1:]] == [0, 1, 2, 3]
    assert trail.statistics().written == 5 and trail.statistics().dropped == 0
    assert registry.get_sample_value("apix_audit_written_total") == 5


async def test_records_arriving_within_linger_share_one_write(autojump_clock: Any) -> None:
    calls: list[tuple[float, int]] = []

    async def write(records: Sequence[AuditRecord]) -> object:
        calls.append((trio.current_time(), len(records)))
        return None

    trail = AuditTrail(write, node="n", wall_clock=wall, registry=CollectorRegistry())
    async with trio.open_nursery() as nursery:
        await nursery.start(trail.serve)
        start = trio.current_time()
        for _ in range(50):
            trail.record("acme", "auth.ok")
            await trio.sleep(LINGER / 100)
        await trio.sleep(1)
        trail.record("acme", "auth.ok")
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert calls == [
        (pytest.approx(start + LINGER), 50),
        (pytest.approx(start + 1.025 + LINGER), 1),
    ]


async def test_a_full_queue_drops_into_the_log_and_the_counter(
    autojump_clock: Any, out: io.StringIO
) -> None:
    store = MemoryAuditLog(wall_clock=wall)
    registry = CollectorRegistry()
    trail = trail_over(store, registry, queue_size=3)
    for n in range(5):  # no writer running: the queue fills up
        trail.record("acme", "permission.denied", sub="eve", detail={"n": n})
    assert trail.statistics().queued == 3
    assert dropped_metric(registry) == 2
    lines = log_lines(out, "audit_dropped")
    assert [line["audit"]["detail"]["n"] for line in lines] == [3, 4]
    assert lines[0]["why"] == "queue full" and lines[0]["org"] == "acme"
    await trail.flush()
    assert len((await store.page("acme", AuditQuery(), KEEP)).entries) == 3


async def test_a_failing_store_drops_the_batch_and_the_writer_goes_on(
    autojump_clock: Any, out: io.StringIO
) -> None:
    registry = CollectorRegistry()
    calls: list[int] = []

    async def broken(records: Sequence[AuditRecord]) -> object:
        calls.append(len(records))
        raise RuntimeError("backend down")

    trail = AuditTrail(broken, node="n", wall_clock=wall, registry=registry)
    async with trio.open_nursery() as nursery:
        await nursery.start(trail.serve)
        trail.record("acme", "auth.ok")
        trail.record("acme", "auth.ok")
        await trio.sleep(1)
        trail.record("acme", "auth.failed", detail={"reason": "expired"})
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert calls == [2, 1]
    assert dropped_metric(registry) == 3
    assert {line["why"] for line in log_lines(out, "audit_dropped")} == {"backend down"}


async def test_a_stalled_store_costs_one_write_timeout_and_never_blocks_record(
    autojump_clock: Any,
) -> None:
    registry = CollectorRegistry()
    stalled = trio.Event()

    async def stuck(records: Sequence[AuditRecord]) -> object:
        stalled.set()
        await trio.sleep_forever()

    trail = AuditTrail(stuck, node="n", wall_clock=wall, registry=registry, write_timeout=2.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(trail.serve)
        trail.record("acme", "auth.ok")
        await stalled.wait()
        start = trio.current_time()
        for _ in range(100):  # meanwhile: synchronous, no time passes
            trail.record("acme", "auth.ok")
        assert trio.current_time() == start
        await trio.sleep_until(start + 2.499)
        assert trail.statistics().dropped == 0
        await trio.sleep_until(start + 2.501)
        assert trail.statistics().dropped == 1  # the stuck batch, at write_timeout
        nursery.cancel_scope.cancel()
    # the rest was tried once more on shutdown (FINAL_FLUSH), then dropped
    assert trail.statistics().dropped == 101


async def test_shutdown_writes_what_is_queued(autojump_clock: Any) -> None:
    store = MemoryAuditLog(wall_clock=wall)
    trail = trail_over(store, CollectorRegistry())
    async with trio.open_nursery() as nursery:
        await nursery.start(trail.serve)
        for _ in range(3):
            trail.record("acme", "auth.ok")
        nursery.cancel_scope.cancel()  # before the writer ever ran
    assert len((await store.page("acme", AuditQuery(), KEEP)).entries) == 3


async def test_details_never_carry_a_token(autojump_clock: Any) -> None:
    store = MemoryAuditLog(wall_clock=wall)
    trail = trail_over(store, CollectorRegistry())
    trail.record(
        "acme",
        "auth.failed",
        detail={"reason": f"bad {TOKEN} here", "token": "secret", "nested": {"authorization": "x"}},
    )
    trail.record_admin("acme", "disconnect", sub="root", detail={"sub": "alice", "reason": "bye"})
    trail.record_state_changed("acme", sub="root", key="cfg.a", change="put", version=3)
    await trail.flush()
    entries = (await store.page("acme", AuditQuery(), KEEP)).entries
    assert TOKEN not in orjson.dumps(entries).decode()
    assert entries[0]["detail"] == {
        "reason": "bad [redacted-jwt] here",
        "token": "[redacted]",
        "nested": {"authorization": "[redacted]"},
    }
    assert entries[1]["type"] == "admin.disconnect"
    assert entries[1]["detail"] == {"sub": "alice", "reason": "bye"}
    assert entries[2]["type"] == "state.changed"
    assert entries[2]["detail"] == {"key": "cfg.a", "op": "put", "version": 3}


async def test_record_never_raises(autojump_clock: Any, out: io.StringIO) -> None:
    trail = AuditTrail(None, node="n", wall_clock=wall, registry=CollectorRegistry())
    trail.record("acme", "auth.ok", detail={"x": object()})  # no store: dropped, logged
    trail.record("acme", "auth.ok", detail=42)  # type: ignore[arg-type]  # not a mapping
    assert trail.statistics().dropped == 1
    assert log_lines(out, "audit_record_failed")
