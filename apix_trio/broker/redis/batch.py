"""Script calls from many trio tasks, pipelined to Redis on one connection.

Theory of operation
-------------------
`ScriptBatcher.call` packs one EVALSHA (RESP bytes) and queues it. One
task (`serve`) owns a connection (`resp.RedisConnection`, trio-native, hiredis
parsing) and runs two loops on it:

- the writer takes whatever is queued (up to `max_batch` calls), writes it
  in one `send_all` (plus, when `publish_wait_replicas` > 0, one fence
  write when the batch holds a durable read and one WAIT when it writes or
  reads durably; see `ScriptBatcher.call`) and goes on with the next batch *without waiting for the
  replies*, as long as fewer than `batch_workers` batches are unanswered;
- the reader reads the replies in order and resolves each call with its own
  reply or error.

Concurrent callers therefore share round trips (the busier the broker, the
larger the batches) and a batch never waits for the previous one's replies:
throughput is bounded by Redis and the socket, not by the round-trip cycle.
There is no asyncio, no trio<->asyncio crossing and no per-reply timer.

A call that meets NOSCRIPT (Redis restarted without persistence, SCRIPT
FLUSH) did not run: the broker's scripts and the missing one are loaded
(SCRIPT LOAD, ahead of everything else on the connection) and the call is
queued again at the front, once.

Timeouts: a caller waits at most `operation_timeout` from the moment it
calls, queueing included; a call whose caller gave up before it was sent is
dropped. The connection is bounded as a whole: when the oldest unanswered
batch has had no reply by its first call's deadline, the connection is
dropped and every call still on it fails with BrokerUnavailable, so no stale
reply can be taken for a later call's; the next call connects again.

The health supervisor PINGs every `health_interval` through the same
pipeline while Redis answers, and with capped exponential backoff while it
does not; together with batch outcomes it drives `healthy`.

Resource handling: the connection belongs to `serve` and is closed when it
ends (cancelled by the broker) or fails; calls queued or in flight then fail
with BrokerUnavailable.
"""

from __future__ import annotations

import collections
from typing import Any

import attrs
import trio

from apix_trio.broker.model import BrokerUnavailable
from apix_trio.broker.redis.keys import fence_key
from apix_trio.broker.redis.resp import RedisConnection, ReplyError, open_connection, parse_url
from apix_trio.broker.redis.scripts import SCRIPTS, Script
from apix_trio.broker.redis.support import RedisTuning, backoff_delay, pack_command, pack_words
from apix_trio.observability.logs import get_logger

log = get_logger(__name__)

CLOSED = "the Redis broker is closed"
_PING = pack_command(b"PING")
_HEAD_CACHE_SIZE = 65_536
FENCE_TTL_MS = b"1000"
"""How long a durable-read fence key lives (it is only ever written)."""


def fence_command(key: bytes) -> bytes:
    """The durable-read fence write in `key`'s slot (see `ScriptBatcher.call`)."""
    return pack_command(b"SET", fence_key(key), b"1", b"PX", FENCE_TTL_MS)


def wait_command(replicas: int, timeout: float) -> bytes:
    """`WAIT replicas ms`: it gives up before the caller does (0.75 x
    `timeout`), so a slow replica reads as "too few acks", not as a timeout."""
    wait_ms = max(1, int(timeout * 1000 * 0.75))
    return pack_command(b"WAIT", b"%d" % replicas, b"%d" % wait_ms)


def too_few_replicas(acked: object, wanted: int, *, read: bool) -> str:
    """The BrokerUnavailable text for a WAIT that `acked` too few replicas."""
    held = "hold what was read" if read else "acknowledged the write"
    return f"only {acked} of {wanted} replicas {held}"


@attrs.define(eq=False, slots=True)
class _Call:
    """One command waiting for its reply."""

    script: Script | None
    """None: a command of the batcher's own (PING, SCRIPT LOAD)."""
    command: bytes
    """`EVALSHA ...`, packed."""
    waits: bool
    """Its outcome counts only once `publish_wait_replicas` replicas hold it."""
    deadline: float
    fence: bytes = b""
    """A durable read's fence write (see `ScriptBatcher.call`), packed."""
    done: trio.Event = attrs.Factory(trio.Event)
    reply: Any = None
    error: str | None = None
    abandoned: bool = False
    reloaded: bool = False

    def resolve(self, reply: Any) -> None:
        if not self.done.is_set():
            self.reply = reply
            self.done.set()

    def fail(self, error: str) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


@attrs.define(eq=False, slots=True)
class _Batch:
    """Calls written together; their replies come in this order."""

    calls: list[_Call]
    wait: bool
    """A WAIT follows the calls."""
    fenced: bool
    """A fence write follows the calls (before the WAIT)."""
    deadline: float
    """The earliest deadline of its calls: no reply by then drops the connection."""


@attrs.frozen
class BatchStatistics:
    queued: int
    """Calls waiting to be written."""
    batches: int
    """Round trips: batches of script calls written and answered."""
    calls: int
    """Script calls sent in those batches."""
    unavailable: int
    """Calls that ended in BrokerUnavailable (timeouts included)."""
    in_flight: int = 0
    """Batches written and not answered yet."""


class ScriptBatcher:
    """Runs EVALSHA calls for any number of trio tasks, pipelined."""

    def __init__(self, url: str, timeout: float, wait_replicas: int, tuning: RedisTuning) -> None:
        self.healthy = False
        self._address = parse_url(url)
        self._timeout = timeout
        self._wait_replicas = wait_replicas
        self._wait_command = wait_command(wait_replicas, timeout)
        self._tuning = tuning
        self._queue: collections.deque[_Call] = collections.deque()
        self._room = trio.lowlevel.ParkingLot()
        self._work = trio.Event()
        self._in_flight: collections.deque[_Batch] = collections.deque()
        self._sent = trio.Event()
        self._slot = trio.Event()
        self._to_load: dict[str, Script] = {}
        self._heads: dict[tuple[bytes, tuple[bytes, ...]], bytes] = {}
        self._closed = False
        self._late = f"redis did not answer within {timeout:g} s"
        self._connection_scope: trio.CancelScope | None = None
        self._connection_error: str | None = None
        self._batches = 0
        self._calls = 0
        self._unavailable = 0

    def statistics(self) -> BatchStatistics:
        return BatchStatistics(
            queued=len(self._queue),
            batches=self._batches,
            calls=self._calls,
            unavailable=self._unavailable,
            in_flight=len(self._in_flight),
        )

    async def call(
        self,
        script: Script,
        keys: tuple[bytes, ...],
        args: tuple[bytes, ...],
        *,
        write: bool,
        durable_read: bool = False,
    ) -> Any:
        """Run `script` with `keys` and `args`; its reply (decoded text).

        With `publish_wait_replicas` > 0 a `write` is followed by WAIT and
        succeeds only once that many replicas hold it. A `durable_read`
        returns only what that many replicas hold: WAIT counts the
        replication offset of the connection's own last write, not of the
        data a read saw, so the read is followed by a fence, a write to the
        `fence_key` of its first key's slot (`SET ... PX`, harmless), whose
        offset covers every write before it, then by the WAIT. A read may
        otherwise hand a client data that a failover then discards.

        Error handling: BrokerUnavailable when there is no reply within
        `operation_timeout`, when Redis answers with an error, or when a
        write (or what a durable read saw) is held by fewer than
        `publish_wait_replicas` replicas.
        """
        # `EVALSHA sha n keys...` is packed once per script and keys (a channel's)
        head = self._heads.get((script.sha_bytes, keys))
        if head is None:
            if len(self._heads) >= _HEAD_CACHE_SIZE:
                self._heads.clear()
            head = pack_words((b"EVALSHA", script.sha_bytes, b"%d" % len(keys), *keys))
            self._heads[script.sha_bytes, keys] = head
        command = b"*%d\r\n%s%s" % (3 + len(keys) + len(args), head, pack_words(args))
        call = _Call(script, command, write, trio.current_time() + self._timeout)
        if durable_read and self._wait_replicas > 0 and keys:
            call.waits = True
            call.fence = fence_command(keys[0])
        return await self._execute(call)

    async def _execute(self, call: _Call) -> Any:
        if self._closed:
            self._unavailable += 1
            raise BrokerUnavailable(CLOSED)
        queue = self._queue
        if len(queue) >= self._tuning.queue_size:  # rare: wait for room, within the deadline
            with trio.move_on_at(call.deadline):
                while len(queue) >= self._tuning.queue_size:
                    await self._room.park()
            if len(queue) >= self._tuning.queue_size:
                call.fail(self._late)
        if not call.done.is_set():
            queue.append(call)
            self._work.set()
            # No cancel scope per call: `_expire` fails every call at its deadline.
            try:
                await call.done.wait()
            finally:
                # Not sent yet: the writer skips it. Sent: its outcome is unknown.
                call.abandoned = not call.done.is_set()
        if call.error is not None:
            self._unavailable += 1
            raise BrokerUnavailable(call.error)
        return call.reply

    def close(self) -> None:
        """Stop taking calls; fail those still queued."""
        self._closed = True
        while self._queue:
            self._queue.popleft().fail(CLOSED)
        self._room.unpark_all()

    # -- the pipeline ---------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect when there is work, pipeline it, reconnect after a failure;
        fail every call at its deadline.

        Resource handling: owns the connection; on exit (cancelled) closes it
        and fails every call still on it.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._expire)
            task_status.started()
            await self._connect_and_pipeline()

    async def _connect_and_pipeline(self) -> None:
        while not self._closed:
            if not self._queue:
                self._work = trio.Event()
                await self._work.wait()
                continue
            connection: RedisConnection | None = None
            try:
                with trio.move_on_after(self._timeout) as connecting:
                    connection = await open_connection(self._address)
                if connection is None or connecting.cancelled_caught:
                    raise BrokerUnavailable(f"redis connect: no answer within {self._timeout:g} s")
                await self._run_connection(connection)
            except BrokerUnavailable as exc:
                self._set_unhealthy(str(exc))
                if connection is None:  # nothing was sent: fail what waited for it
                    self._fail_queued(str(exc))
            finally:
                if connection is not None:
                    await connection.aclose()
                self._fail_in_flight(CLOSED if self._closed else "redis connection lost")

    async def _run_connection(self, connection: RedisConnection) -> None:
        """Writer and reader on one connection until either fails or `_expire`
        drops it (raised as BrokerUnavailable)."""
        failure: list[BrokerUnavailable] = []

        async def guarded(loop: Any, scope: trio.CancelScope) -> None:
            try:
                await loop(connection)
            except BrokerUnavailable as exc:
                failure.append(exc)
                scope.cancel()

        self._connection_error = None
        async with trio.open_nursery() as nursery:
            self._connection_scope = nursery.cancel_scope
            nursery.start_soon(guarded, self._write_batches, nursery.cancel_scope)
            nursery.start_soon(guarded, self._read_replies, nursery.cancel_scope)
        self._connection_scope = None
        if failure:
            raise failure[0]
        if self._connection_error is not None:
            raise BrokerUnavailable(self._connection_error)

    async def _expire(self) -> None:
        """Fail each call at its deadline: queued ones one by one; when a
        written batch is past its deadline unanswered, drop the connection
        (every call on it fails; no late reply can be taken for another's)."""
        queue, in_flight = self._queue, self._in_flight
        idle = self._timeout / 4  # nothing due: look again after this long
        while True:
            now = trio.current_time()
            while queue and (queue[0].deadline <= now or queue[0].done.is_set()):
                late = queue.popleft()
                late.fail(self._late)
            if in_flight and in_flight[0].deadline <= now:
                if self._connection_scope is not None:
                    self._connection_error = self._late
                    self._connection_scope.cancel()
                self._fail_in_flight(self._late)
            due = now + idle
            if queue:
                due = min(due, queue[0].deadline)
            if in_flight:
                due = min(due, in_flight[0].deadline)
            await trio.sleep_until(due)

    async def _write_batches(self, connection: RedisConnection) -> None:
        queue, in_flight = self._queue, self._in_flight
        max_batch, depth = self._tuning.max_batch, self._tuning.batch_workers
        while True:
            while len(in_flight) >= depth:
                self._slot = trio.Event()
                await self._slot.wait()
            batch: list[_Call] = []
            if self._to_load:
                batch = self._load_calls()
            while queue and len(batch) < max_batch:
                call = queue.popleft()
                if not call.abandoned:
                    batch.append(call)
            if self._room.statistics().tasks_waiting:
                self._room.unpark_all()
            if not batch:
                self._work = trio.Event()
                await self._work.wait()
                continue
            if not in_flight and connection.readable_while_idle():
                queue.extendleft(reversed(batch))  # not sent: they go out on the next connection
                raise BrokerUnavailable("redis closed the idle connection")
            wait = self._wait_replicas > 0 and any(call.waits for call in batch)
            commands = [call.command for call in batch]
            fence = next((call.fence for call in reversed(batch) if call.fence), b"")
            if fence:
                commands.append(fence)
            if wait:
                commands.append(self._wait_command)
            deadline = min(call.deadline for call in batch)
            in_flight.append(_Batch(batch, wait, bool(fence), deadline))
            self._sent.set()
            await connection.send(b"".join(commands))

    def _load_calls(self) -> list[_Call]:
        """SCRIPT LOAD of the broker's scripts and those that met NOSCRIPT."""
        scripts = {script.sha: script for script in SCRIPTS}
        scripts.update(self._to_load)
        self._to_load = {}
        deadline = trio.current_time() + self._timeout
        return [
            _Call(None, pack_command(b"SCRIPT", b"LOAD", script.source.encode()), False, deadline)
            for script in scripts.values()
        ]

    async def _read_replies(self, connection: RedisConnection) -> None:
        in_flight = self._in_flight
        while True:
            while not in_flight:
                self._sent = trio.Event()
                await self._sent.wait()
            batch = in_flight[0]
            expected = len(batch.calls) + batch.fenced + batch.wait
            replies: list[Any] = []
            while len(replies) < expected:  # bounded by `_expire`
                reply = connection.reply_nowait()
                if reply is False:
                    await connection.receive()
                else:
                    replies.append(reply)
            in_flight.popleft()
            self._slot.set()
            self._resolve(batch, replies)

    def _resolve(self, batch: _Batch, replies: list[Any]) -> None:
        self.healthy = True
        acked: int | None = None
        if batch.wait:
            waited = replies.pop()
            acked = waited if isinstance(waited, int) else 0
        if batch.fenced and isinstance(replies.pop(), ReplyError):
            acked = 0  # unfenced: what the reads saw is not known to be replicated
        again: list[_Call] = []
        scripts = 0
        for call, reply in zip(batch.calls, replies, strict=True):
            script = call.script
            if script is None:
                if isinstance(reply, ReplyError):
                    log.warning("redis_command_failed", error=str(reply))
                call.resolve(reply)
                continue
            scripts += 1
            if isinstance(reply, ReplyError):
                if str(reply).startswith("NOSCRIPT") and not call.reloaded:
                    call.reloaded = True  # it did not run: load, run once more
                    self._to_load[script.sha] = script
                    again.append(call)
                else:
                    call.fail(f"redis {script.name} failed: {reply}")
            elif call.waits and acked is not None and acked < self._wait_replicas:
                call.fail(too_few_replicas(acked, self._wait_replicas, read=bool(call.fence)))
            else:
                call.resolve(reply)
        if scripts:
            self._batches += 1
            self._calls += scripts
        if again:
            self._queue.extendleft(reversed(again))
            self._work.set()

    def _fail_queued(self, error: str) -> None:
        while self._queue:
            self._queue.popleft().fail(error)
        self._room.unpark_all()

    def _fail_in_flight(self, error: str) -> None:
        while self._in_flight:
            for call in self._in_flight.popleft().calls:
                call.fail(error)

    def _set_unhealthy(self, reason: str) -> None:
        if self.healthy:
            log.warning("redis_unavailable", reason=reason)
        self.healthy = False

    # -- health ---------------------------------------------------------------------

    async def ping(self) -> None:
        """One PING through the pipeline. Error handling: BrokerUnavailable."""
        call = _Call(None, _PING, False, trio.current_time() + self._timeout)
        reply = await self._execute(call)
        if isinstance(reply, ReplyError):
            raise BrokerUnavailable(f"redis PING failed: {reply}")

    async def serve_health(self, *, task_status: trio.TaskStatus[None]) -> None:
        """PING Redis forever; reports started after the first answer (or not)."""
        failures = 0
        started = False
        while True:
            try:
                await self.ping()
            except BrokerUnavailable as exc:
                self._set_unhealthy(str(exc))
                failures += 1
                delay = backoff_delay(failures, self._tuning.backoff_base, self._tuning.backoff_cap)
            else:
                if not self.healthy or failures:
                    log.info("redis_available", failures=failures)
                self.healthy = True
                failures = 0
                delay = self._tuning.health_interval
            if not started:
                started = True
                task_status.started()
            await trio.sleep(delay)
