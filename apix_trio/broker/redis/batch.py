"""Script calls from many trio tasks, sent to Redis a batch at a time.

Theory of operation
-------------------
Crossing from trio into asyncio costs about as much as a small Redis command,
and redis-py's per-command overhead is larger still, so calls are never sent
one by one. `ScriptBatcher.call` packs one EVALSHA (RESP bytes) and queues it
on a memory channel; each of `batch_workers` worker tasks takes whatever is
queued (up to `max_batch`), crosses into asyncio once, writes the whole batch
on one connection (plus one WAIT when `publish_wait_replicas` > 0 and the
batch writes), reads every reply, and resolves each call with its own reply
or error. Concurrent callers therefore share round trips: the busier the
broker, the larger the batches.

A batch that meets NOSCRIPT (Redis restarted without persistence, SCRIPT
FLUSH) loads every script and reruns just those calls: a call that got
NOSCRIPT did not run.

Timeouts: a caller waits at most `operation_timeout` from the moment it
calls, queueing included; a call whose caller gave up before it was sent is
dropped. The exchange itself is bounded on the trio side (`cross`): on
timeout the asyncio task is cancelled and its connection is dropped, so no
stale reply can reach the next batch. There is no redis-py socket timeout
(an asyncio timer per reply costs more than the reply) and no redis-py
retry (a resent publish could be stored twice).

The health supervisor PINGs every `health_interval` while Redis answers and
with capped exponential backoff while it does not; together with batch
outcomes it drives `healthy`.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
import trio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from apix_trio.broker.model import BrokerUnavailable
from apix_trio.broker.redis.scripts import SCRIPTS, Script
from apix_trio.broker.redis.support import (
    RedisTuning,
    aio_close_client,
    backoff_delay,
    cross,
    pack_command,
)
from apix_trio.observability.logs import get_logger

log = get_logger(__name__)

CLOSED = "the Redis broker is closed"


@attrs.define(eq=False)
class _Call:
    """One script call waiting for its batch."""

    script: Script
    command: bytes
    """`EVALSHA ...`, packed."""
    write: bool
    done: trio.Event = attrs.Factory(trio.Event)
    reply: Any = None
    error: str | None = None
    abandoned: bool = False

    def resolve(self, reply: Any) -> None:
        if not self.done.is_set():
            self.reply = reply
            self.done.set()

    def fail(self, error: str) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


@attrs.frozen
class BatchStatistics:
    queued: int
    batches: int
    calls: int
    """Calls sent in those batches."""
    unavailable: int
    """Calls that ended in BrokerUnavailable (timeouts included)."""


class ScriptBatcher:
    """Runs EVALSHA calls for any number of trio tasks, batched."""

    def __init__(self, url: str, timeout: float, wait_replicas: int, tuning: RedisTuning) -> None:
        self.healthy = False
        self._url = url
        self._timeout = timeout
        self._wait_replicas = wait_replicas
        # WAIT gives up before the caller does, so a slow replica reads as
        # "too few acks" rather than as a timeout.
        wait_ms = max(1, int(timeout * 1000 * 0.75))
        self._wait_command = pack_command(b"WAIT", b"%d" % wait_replicas, b"%d" % wait_ms)
        self._tuning = tuning
        self._send, self._receive = trio.open_memory_channel[_Call](tuning.queue_size)
        self._batches = 0
        self._calls = 0
        self._unavailable = 0
        self._pool: aioredis.BlockingConnectionPool | None = None
        self._client: aioredis.Redis | None = None

    def statistics(self) -> BatchStatistics:
        return BatchStatistics(
            queued=self._receive.statistics().current_buffer_used,
            batches=self._batches,
            calls=self._calls,
            unavailable=self._unavailable,
        )

    async def call(
        self, script: Script, keys: tuple[bytes, ...], args: tuple[bytes, ...], *, write: bool
    ) -> Any:
        """Run `script` with `keys` and `args`; its reply (decoded text).

        Error handling: BrokerUnavailable when there is no reply within
        `operation_timeout`, when Redis answers with an error, or when a
        write was acknowledged by fewer than `publish_wait_replicas` replicas.
        """
        command = pack_command(b"EVALSHA", script.sha_bytes, b"%d" % len(keys), *keys, *args)
        call = _Call(script, command, write)
        try:
            with trio.move_on_after(self._timeout):
                try:
                    try:
                        self._send.send_nowait(call)
                    except trio.WouldBlock:
                        await self._send.send(call)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    call.fail(CLOSED)
                await call.done.wait()
        finally:
            # Not sent yet: the worker skips it. Sent: its outcome is unknown.
            call.abandoned = not call.done.is_set()
        if not call.done.is_set():
            self._unavailable += 1
            raise BrokerUnavailable(f"redis did not answer within {self._timeout:g} s")
        if call.error is not None:
            self._unavailable += 1
            raise BrokerUnavailable(call.error)
        return call.reply

    def close(self) -> None:
        """Stop taking calls; fail those still queued."""
        self._send.close()
        while True:
            try:
                call = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            call.fail(CLOSED)

    async def serve_batches(self, *, task_status: trio.TaskStatus[None]) -> None:
        """A worker: take whatever is queued, run it as one batch, repeat."""
        task_status.started()
        max_batch = self._tuning.max_batch
        while True:
            try:
                batch = [await self._receive.receive()]
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return
            while len(batch) < max_batch:
                try:
                    batch.append(self._receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
            batch = [call for call in batch if not call.abandoned]
            if not batch:
                continue
            try:
                await self._run_batch(batch)
            except Exception as exc:
                # A bug, not Redis trouble: fail this batch, keep serving.
                log.exception("redis_batch_crashed")
                for call in batch:
                    call.fail(f"internal error in the Redis broker: {exc!r}")
            finally:
                for call in batch:  # cancelled mid-batch: the broker is closing
                    call.fail(CLOSED)

    async def _run_batch(self, batch: list[_Call]) -> None:
        wait = self._wait_replicas > 0 and any(call.write for call in batch)
        try:
            outcomes = await cross("batch", self._aio_execute, batch, wait, within=self._timeout)
        except BrokerUnavailable as exc:
            self._set_unhealthy(str(exc))
            for call in batch:
                call.fail(str(exc))
            return
        self._batches += 1
        self._calls += len(batch)
        self.healthy = True
        for call, (reply, acked) in zip(batch, outcomes, strict=True):
            if isinstance(reply, Exception):
                call.fail(f"redis {call.script.name} failed: {reply}")
            elif call.write and acked is not None and acked < self._wait_replicas:
                call.fail(f"only {acked} of {self._wait_replicas} replicas acknowledged the write")
            else:
                call.resolve(reply)

    def _set_unhealthy(self, reason: str) -> None:
        if self.healthy:
            log.warning("redis_unavailable", reason=reason)
        self.healthy = False

    async def serve_health(self, *, task_status: trio.TaskStatus[None]) -> None:
        """PING Redis forever; reports started after the first answer (or not)."""
        failures = 0
        started = False
        while True:
            try:
                await cross("ping", self._aio_ping, within=self._timeout)
            except BrokerUnavailable as exc:
                self._set_unhealthy(str(exc))
                failures += 1
                delay = backoff_delay(failures, self._tuning.backoff_base, self._tuning.backoff_cap)
            else:
                if not self.healthy:
                    log.info("redis_available", failures=failures)
                self.healthy = True
                failures = 0
                delay = self._tuning.health_interval
            if not started:
                started = True
                task_status.started()
            await trio.sleep(delay)

    # -- the asyncio side (runs on the trio-asyncio loop) -----------------------

    async def aio_open(self) -> None:
        self._pool = aioredis.BlockingConnectionPool.from_url(
            self._url,
            max_connections=self._tuning.batch_workers + 2,
            timeout=self._timeout,
            socket_timeout=None,  # see the module docstring
            socket_connect_timeout=self._timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
            protocol=2,
        )
        self._client = aioredis.Redis(connection_pool=self._pool)

    async def aio_close(self) -> None:
        await aio_close_client(self._client, self._pool)

    async def _aio_ping(self) -> None:
        assert self._client is not None
        await self._client.ping()

    async def _aio_execute(self, batch: list[_Call], wait: bool) -> list[tuple[Any, int | None]]:
        """Run the batch; rerun the calls that met NOSCRIPT (they did not run)."""
        outcomes = await self._aio_exchange(batch, wait)
        missing = [
            i
            for i, (reply, _) in enumerate(outcomes)
            if isinstance(reply, redis_errors.NoScriptError)
        ]
        if missing:
            assert self._client is not None
            # Also the scripts of modules beside the broker's own (sessions, groups).
            for script in dict.fromkeys([*SCRIPTS, *(batch[i].script for i in missing)]):
                await self._client.script_load(script.source)
            again = await self._aio_exchange([batch[i] for i in missing], wait)
            for i, outcome in zip(missing, again, strict=True):
                outcomes[i] = outcome
        return outcomes

    async def _aio_exchange(self, batch: list[_Call], wait: bool) -> list[tuple[Any, int | None]]:
        """Write the batch at once and read every reply, on one connection.

        Not redis-py's Pipeline: it packs each command in Python and arms an
        asyncio timer per reply. A failed or cancelled exchange disconnects
        the connection, so no reply is left behind for the next batch.
        """
        assert self._pool is not None
        commands = [call.command for call in batch]
        if wait:
            commands.append(self._wait_command)
        connection = await self._pool.get_connection()
        try:
            await connection.send_packed_command(commands, check_health=False)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await connection.read_response(timeout=math.inf))
                except redis_errors.ResponseError as error:  # this command's own error
                    replies.append(error)
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        finally:
            await self._pool.release(connection)
        acked: int | None = None
        if wait:
            waited = replies.pop()
            acked = waited if isinstance(waited, int) else 0
        return [(reply, acked) for reply in replies]
