"""The node's audit writer: `record()` never blocks or fails; a task writes batches.

Theory of operation
-------------------
Every org has an append-only audit trail (HTTP_API.md, "Audit trail"): the
store is the broker's (`apix_trio.broker.audit`), this module is the node's
side of it. Code that witnesses an auditable occurrence calls
`AuditTrail.record(org, type, ...)`, a plain synchronous method: it builds an
`AuditRecord` (time stamp, this node's id, the detail with secrets redacted)
and appends it to a bounded deque. It never awaits, never raises, and costs
about a microsecond, so it can sit on any path, the publish path included.

`AuditTrail.serve` (a task in the server's services nursery) waits `linger`
seconds after the first queued record, so that records arriving meanwhile
share its batch (a wake-up per record costs more than the record), then
takes up to `batch_size` queued records at a time and hands them to the store's
`append_many`. Nothing is retried: when the queue is full, or a write fails
(the backend is down or too slow), the records concerned are written to the
JSON log as `audit_dropped` lines (each with the whole entry, so nothing is
lost for an operator who keeps logs) and counted in
`apix_audit_dropped_total`. A write is bounded by `write_timeout` as well as
by the store's own operation timeout, so a stalled backend can hold at most
one batch while the queue keeps absorbing (or dropping) new records.

On cancellation (shutdown) the task makes one last, shielded attempt of at
most `FINAL_FLUSH` seconds to write what is still queued.

Tokens never reach an entry: the detail goes through the log redaction
(`logs.redact_value`: secret-named keys and JWT-shaped strings), and the
callers pass reasons, never tokens.

This module sits below the broker: it knows the store only as the
`AuditWriter` callable the server wires in (`Broker.audit.append_many`).
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import attrs
import trio
from prometheus_client import CollectorRegistry, Counter

from apix_trio.observability.logs import _is_secret_key, get_logger, redact_value

log = get_logger("apix.audit")

QUEUE_SIZE = 10_000
"""Records waiting for the writer; more are dropped (logged and counted)."""
BATCH_SIZE = 256
"""Records per `append_many` call."""
WRITE_TIMEOUT = 5.0
"""Seconds one batch may take before it counts as failed (dropped)."""
LINGER = 0.05
"""Seconds the writer waits after the first queued record for more to join
its batch (one wake-up per record would cost more than the record)."""
FINAL_FLUSH = 1.0
"""Seconds the writer spends on what is still queued when it is cancelled."""


class AuditType(enum.StrEnum):
    """The entry types of HTTP_API.md's audit trail (`admin.*` is open-ended)."""

    AUTH_FAILED = "auth.failed"
    AUTH_OK = "auth.ok"
    CONNECTION_CLOSED = "connection.closed"
    PERMISSION_DENIED = "permission.denied"
    RATE_LIMITED = "rate.limited"
    STATE_CHANGED = "state.changed"
    GROUP_DEAD_LETTER = "group.dead_letter"


ADMIN_PREFIX = "admin."


@attrs.define(slots=True)
class AuditRecord:
    """One audit entry before the store gives it an id.

    `ts` is the wall-clock milliseconds when it happened, on `node`. Empty
    strings stand for what does not apply (`sub`, `conn`, `ip`). Treat it as
    immutable (not frozen only because frozen attrs classes cost ~1 us more
    to build, on the publish path).
    """

    org: str
    ts: int
    type: str
    sub: str = ""
    conn: str = ""
    node: str = ""
    ip: str = ""
    detail: Mapping[str, Any] = attrs.field(factory=dict)

    def as_entry(self, entry_id: str) -> dict[str, Any]:
        """The entry as HTTP_API.md shows it, with the id the store gave it."""
        return {
            "id": entry_id,
            "ts": self.ts,
            "type": self.type,
            "sub": self.sub,
            "conn": self.conn,
            "node": self.node,
            "ip": self.ip,
            "detail": dict(self.detail),
        }


AuditWriter = Callable[[Sequence[AuditRecord]], Awaitable[object]]
"""Stores records (the broker's `audit.append_many` with its retention)."""


@attrs.frozen
class AuditStatistics:
    queued: int
    recorded: int
    written: int
    dropped: int


class AuditTrail:
    """The node's audit writer (see the module docstring).

    `write` may be None (no store: every record goes to the JSON log as
    dropped, e.g. a hub built without an audit-capable broker).
    """

    def __init__(
        self,
        write: AuditWriter | None,
        *,
        node: str,
        wall_clock: Callable[[], float],
        registry: CollectorRegistry | None = None,
        queue_size: int = QUEUE_SIZE,
        batch_size: int = BATCH_SIZE,
        write_timeout: float = WRITE_TIMEOUT,
        linger: float = LINGER,
    ) -> None:
        self._write = write
        self.node = node
        self._wall_clock = wall_clock
        self._queue: collections.deque[AuditRecord] = collections.deque()
        self._queue_size = queue_size
        self._batch_size = batch_size
        self._write_timeout = write_timeout
        self._linger = linger
        self._wake = trio.Event()
        self._recorded = 0
        self._written = 0
        self._dropped_count = 0
        if registry is None:
            registry = CollectorRegistry()
        self._dropped = Counter(
            "apix_audit_dropped",
            "Audit entries not stored (queue full or backend down); logged as JSON lines",
            registry=registry,
        )
        self._stored = Counter(
            "apix_audit_written", "Audit entries stored in the org trails", registry=registry
        )

    # -- the callers' side (synchronous, never raises) ---------------------------

    def record(
        self,
        org: str,
        type: str,
        *,
        sub: str = "",
        conn: str = "",
        ip: str = "",
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Queue one entry for `org`'s trail. Never blocks, never raises."""
        try:
            entry = AuditRecord(
                org=org,
                ts=int(self._wall_clock() * 1000),
                type=str(type),
                sub=sub,
                conn=conn,
                node=self.node,
                ip=ip,
                detail=_redacted(detail),
            )
            self._recorded += 1
            if len(self._queue) >= self._queue_size or self._write is None:
                self._drop([entry], "queue full" if self._write is not None else "no store")
                return
            self._queue.append(entry)
            self._wake.set()
        except Exception:
            log.exception("audit_record_failed", org=org, type=str(type))

    def record_admin(
        self, org: str, action: str, *, sub: str, ip: str = "", detail: Mapping[str, Any]
    ) -> None:
        """`admin.<action>` for an admin route that changed something (HTTP
        layer): `detail` holds the request's fields."""
        self.record(org, ADMIN_PREFIX + action, sub=sub, ip=ip, detail=detail)

    def record_state_changed(
        self,
        org: str,
        *,
        sub: str,
        key: str,
        change: str,
        version: int | str | None,
        ip: str = "",
    ) -> None:
        """`state.changed` for a change made through the HTTP API (`change`:
        put, patch or delete; `version` the new one)."""
        detail = {"key": key, "op": change, "version": version}
        self.record(org, AuditType.STATE_CHANGED, sub=sub, ip=ip, detail=detail)

    def statistics(self) -> AuditStatistics:
        return AuditStatistics(
            queued=len(self._queue),
            recorded=self._recorded,
            written=self._written,
            dropped=self._dropped_count,
        )

    # -- the writer task ---------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write queued records in batches until cancelled (see the module docstring).

        Resource handling: on cancellation, one shielded attempt of at most
        FINAL_FLUSH seconds writes what is still queued; the rest is dropped
        (logged and counted). Error handling: a failed batch is dropped and
        the task goes on; nothing escapes.
        """
        task_status.started()
        try:
            while True:
                if not self._queue:
                    self._wake = trio.Event()
                    await self._wake.wait()
                if len(self._queue) < self._batch_size:
                    await trio.sleep(self._linger)
                await self._write_batch(self._take(), self._write_timeout)
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(FINAL_FLUSH):
                    while self._queue:
                        await self._write_batch(self._take(), FINAL_FLUSH)
                if self._queue:
                    self._drop(list(self._queue), "shutdown")
                    self._queue.clear()

    async def flush(self) -> None:
        """Write everything queued now (tests; the writer task does this itself)."""
        while self._queue:
            await self._write_batch(self._take(), self._write_timeout)

    def _take(self) -> list[AuditRecord]:
        queue = self._queue
        return [queue.popleft() for _ in range(min(self._batch_size, len(queue)))]

    async def _write_batch(self, batch: list[AuditRecord], within: float) -> None:
        if not batch:
            return
        assert self._write is not None
        outcome: str | None = None  # None while in flight
        try:
            with trio.move_on_after(within):
                try:
                    await self._write(batch)
                    outcome = ""
                except Exception as exc:  # BrokerUnavailable and anything else: never fatal
                    outcome = str(exc) or type(exc).__name__
            if outcome is None:
                outcome = "timed out"
        finally:
            if outcome is None:
                # Cancelled from outside (shutdown): back to the front of the
                # queue, for the final flush.
                self._queue.extendleft(reversed(batch))
        if outcome:
            self._drop(batch, outcome)
        else:
            self._written += len(batch)
            self._stored.inc(len(batch))

    def _drop(self, entries: list[AuditRecord], why: str) -> None:
        self._dropped_count += len(entries)
        self._dropped.inc(len(entries))
        for entry in entries:
            log.warning(
                "audit_dropped",
                why=why,
                org=entry.org,
                sub=entry.sub,
                conn=entry.conn,
                audit=entry.as_entry(""),
            )


_SCALARS = (int, float, bool, type(None))


def _redacted(detail: Mapping[str, Any] | None) -> dict[str, Any]:
    """`detail` without secrets (`logs.redact_value`). The common case, flat
    numbers and strings with nothing token-like under harmless keys, is
    copied as it is (a full redaction walk costs a few microseconds)."""
    if not detail:
        return {}
    for key, value in detail.items():
        if type(value) is str:
            if "eyJ" in value:
                break
        elif type(value) not in _SCALARS:
            break
        if _is_secret_key(key):
            break
    else:
        return dict(detail)
    redacted: dict[str, Any] = redact_value(dict(detail))
    return redacted
