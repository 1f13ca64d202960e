"""One WebSocket connection: its task, its on-demand helpers, its timers, its close.

Theory of operation
-------------------
An idle connection is one task and a few small objects. `Connection.run`
(the task `handle_stream` runs in) is the reader: the only code that reads
the socket. It decodes frames through the sans-IO `ServerProtocol`, answers
what needs no I/O (bad frames, unauthenticated ops, rate limits) and queues
commands; it never waits on the broker, so pings and close frames keep
flowing. Helper tasks run only while they have work:

- op worker: started when a command is queued and none is running, gone
  when the queue is empty. It runs commands one at a time, in arrival order
  (one client's publishes are stored in the order it sent them), each with
  the time it arrived (the `unavailable` bound counts from arrival).
- writer: started when a socket write could not complete at once (the
  socket is full, or the stream is not a plain socket), gone once the
  outbox is empty.
- closing reader: keeps reading while the close procedure waits (below).

The connection has no nursery of its own (one costs every idle connection
~1.3 KB and every set-up a cancel scope): its helpers are started in the
nursery its own task runs in (`handle_stream` passes it; on the server,
the connections nursery), each under a cancel scope the connection keeps.
The promise of a nursery still holds: `run` cancels every helper still
running when it ends (normally, by an error or cancelled from outside) and
waits for them, shielded, before it returns; a helper's error ends the
connection (1011) and is raised from `run`, not into the shared nursery.

Frames (replies, pushes, events, pongs, pings) are queued in the outbox and
written by the node's write coalescer (`gateway/coalesce.py`): one `send`
per connection per scheduler tick, whatever the number of frames.

Timers (heartbeat ping and pong deadline, auth timeout, token warning and
expiry) are entries in the node's timer service (`gateway/timers.py`), not
tasks; the connection holds at most three entries and cancels them when it
closes, so it leaves none behind.

Any code may call `request_close(code)`: it is synchronous, idempotent and
the first call wins. It cancels the reader's scope; `run` then keeps reading
in a helper (pings answered, the peer's close frame noticed) while it waits
for the outbox to drain (with `flush`), cancels the helpers (a socket write
in progress finishes, bounded by the send timeout), sends the close frame,
waits a moment for the peer's close (unless the socket is dead), and stops
reading. Cleanup (router, registry, metrics, timers) is synchronous in
`finally`, so a cancelled connection leaves nothing behind.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence

import trio
from structlog.typing import FilteringBoundLogger

from apix_trio.auth.identity import Identity
from apix_trio.auth.permissions import Permissions
from apix_trio.delivery.backoff import jittered_first_ping
from apix_trio.gateway import auditing
from apix_trio.gateway.hub import Hub
from apix_trio.gateway.outbox import Outbox, Queued
from apix_trio.gateway.ratelimit import AbuseTracker, TokenBucket
from apix_trio.gateway.timers import TimerEntry
from apix_trio.gateway.websocket import PeerClosed, ProtocolClose, ServerWebSocket
from apix_trio.protocol.codec import encode_error, encode_push
from apix_trio.protocol.codes import CLOSE_REASONS, CloseCode, ErrorCode
from apix_trio.protocol.frames import Auth, Command
from apix_trio.protocol.ids import StreamId
from apix_trio.protocol.machine import Rejection, ServerProtocol
from apix_trio.protocol.wire import text_frame_str
from apix_trio.routing.state import StateWatch
from apix_trio.routing.subscriptions import ChannelSubscription, SentTracker

OP_QUEUE = 64
CLOSE_WAIT = 2.0
FLUSH_WAIT = 2.0
FLUSH_BYTES = 256 * 1024


def new_connection_id() -> str:
    return secrets.token_hex(8)


class Connection:
    """See the module docstring."""

    __slots__ = (
        "__weakref__",
        "_abuse",
        "_auth_timer",
        "_closing",
        "_crash",
        "_flush_before_close",
        "_flush_marked",
        "_heartbeat_timer",
        "_helpers",
        "_helpers_gone",
        "_joined_org",
        "_nursery",
        "_op_room",
        "_ops",
        "_ping_counter",
        "_ping_payload",
        "_ping_sent_at",
        "_read_scope",
        "_reader_done",
        "_token_timer",
        "_work_scopes",
        "_worker_running",
        "_writer_running",
        "backend_failed",
        "bucket",
        "claimed",
        "close_code",
        "close_reason",
        "hub",
        "id",
        "identity",
        "opened_at",
        "outbox",
        "outbox_limit_items",
        "peer",
        "permissions",
        "protocol",
        "received_at",
        "session",
        "state_watches",
        "subscriptions",
        "ws",
    )

    def __init__(
        self,
        hub: Hub,
        ws: ServerWebSocket,
        *,
        conn_id: str | None = None,
        peer: str | None = None,
    ) -> None:
        settings = hub.settings
        self.hub = hub
        self.ws = ws
        self.id = conn_id or new_connection_id()
        self.identity: Identity | None = None
        self.permissions: Permissions | None = None
        self.session = ""
        self.subscriptions: dict[str, ChannelSubscription] = {}
        self.state_watches: dict[str, StateWatch] = {}
        """State subscriptions by key (`commands.state`)."""
        self.outbox_limit_items = settings.limits.outbox_size
        self.outbox = Outbox(settings.limits.outbox_size, settings.limits.outbox_bytes)
        self.protocol = ServerProtocol(settings.limits.bad_frames)
        rate = settings.limits.ops_per_second
        self.bucket = TokenBucket(rate, 2 * rate)
        self._abuse: AbuseTracker | None = None  # made at the first rate-limited op
        self.close_code: int | None = None
        self.close_reason = ""
        self.opened_at = trio.current_time()
        # The audit trail's `ip` (the handshake has looked it up already).
        self.peer = auditing.peer_address(ws.stream) if peer is None else peer
        self.claimed: tuple[str, str] | None = None  # org/sub of a verified token refused later
        self.received_at = 0.0  # arrival of the command the op worker runs
        self._closing = False
        self._read_scope = trio.CancelScope()
        self._reader_done: trio.Event | None = None  # made when the close begins
        # Where helpers start (the nursery the connection's task runs in);
        # None: no more helpers.
        self._nursery: trio.Nursery | None = None
        # The cancel scopes of the op worker and writer while they run.
        self._work_scopes: list[trio.CancelScope] = []
        # Every helper's scope (the closing reader's too) while it runs:
        # `run` cancels them and waits until the list is empty.
        self._helpers: list[trio.CancelScope] = []
        self._helpers_gone: trio.Event | None = None  # made when `run` waits
        self._crash: Exception | None = None  # a helper's error, raised from `run`
        # Commands with the trio time they arrived: the `unavailable` bound
        # counts from arrival, not from when the op worker gets to them. A
        # list (at most OP_QUEUE long), not a deque: 56 bytes idle, not 760.
        self._ops: list[tuple[Command, float]] = []
        self._op_room: trio.lowlevel.ParkingLot | None = None
        self._worker_running = False
        self._writer_running = False
        self._flush_marked = False
        self._heartbeat_timer: TimerEntry | None = None
        self._auth_timer: TimerEntry | None = None
        self._token_timer: TimerEntry | None = None
        self._ping_payload = b""
        self._ping_sent_at = 0.0
        self._ping_counter = 0
        self.backend_failed = False  # the last broker call of this connection failed
        self._joined_org = False
        self._flush_before_close = True
        ws.on_pong = self._on_pong
        ws.send_control = self._send_control

    # -- identity --------------------------------------------------------------

    @property
    def org(self) -> str:
        assert self.identity is not None
        return self.identity.org

    @property
    def sub(self) -> str:
        assert self.identity is not None
        return self.identity.sub

    @property
    def log(self) -> FilteringBoundLogger:
        """The hub's logger bound to this connection (and its org and sub once
        authenticated). Bound on each use, not kept: a bound logger and its
        context cost every idle connection ~600 bytes; a log line is rare."""
        identity = self.identity
        if identity is None:
            return self.hub.log.bind(conn=self.id)
        return self.hub.log.bind(conn=self.id, org=identity.org, sub=identity.sub)

    @property
    def abuse(self) -> AbuseTracker:
        if self._abuse is None:
            self._abuse = AbuseTracker()
        return self._abuse

    def authenticate(self, identity: Identity) -> None:
        """Adopt `identity` (the caller has taken its connection slot)."""
        self.hub.registry.try_join_org(identity.org, 0)
        self._joined_org = True
        self.identity = identity
        self.permissions = Permissions.from_identity(identity)
        self.session = secrets.token_urlsafe(12)
        self.protocol.mark_authenticated()
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None
        self._restart_token_timers()
        self.hub.sessions.opened(self)
        self.hub.directory.opened(self.id, identity.org, identity.sub)

    def group_memberships(self) -> list[tuple[str, str]]:
        """(channel, group) of every consumer group this connection is in."""
        return self.hub.groups.memberships(self)

    def replace_identity(self, identity: Identity) -> None:
        """After a successful `refresh`: new claims and expiry, same org/sub."""
        self.identity = identity
        self.permissions = Permissions.from_identity(identity)
        self._restart_token_timers()

    def auth_result(self, *, resumed: bool = False) -> dict[str, object]:
        assert self.identity is not None
        return {
            "conn": self.id,
            "org": self.identity.org,
            "sub": self.identity.sub,
            "exp": self.identity.exp,
            "session": self.session,
            "heartbeat": self.hub.settings.heartbeat.interval,
            "resumed": resumed,
        }

    # -- outbound --------------------------------------------------------------

    def send_text(self, text: str) -> None:
        """Write or queue a reply or push; a full outbox closes the connection
        (4009).

        Written at once when nothing of this connection is queued or being
        written and no command waits behind the one being answered: no
        other frame of this connection is coming that could share its write
        (a reply goes to one connection, unlike an event's frame), so
        waiting for the coalescer would only delay it. Otherwise queued
        like an event's frame (`enqueue_event`)."""
        frame = text_frame_str(text)
        outbox = self.outbox
        if (
            not self._ops
            and not self._flush_marked
            and not self._writer_running
            and not len(outbox)
            and outbox.accepting
        ):
            self._write_now(frame, None, None, None)
            return
        self.enqueue_event(frame, None)

    def enqueue_event(
        self,
        frame: bytes,
        ts: int | None,
        tracker: SentTracker | None = None,
        event_id: StreamId | None = None,
    ) -> None:
        """Write or queue an event frame; `tracker.sent_id` becomes `event_id`
        once written. `ts` None: not an event (a reply, a presence push), so
        it is neither counted as delivered nor timed. A full outbox closes
        the connection (4009).

        Written at once, without waiting for the coalescer, when `frame` is
        the one being written at once (`WriteCoalescer.direct_frame`, or it
        becomes that one: `begin_direct`) and nothing of this connection is
        queued or being written: then nothing can be overtaken. Whatever the
        socket does not take is queued first, for the writer task. Otherwise
        queued, and written by the coalescer at the end of this tick, or by
        the writer task when one is running."""
        outbox = self.outbox
        coalescer = self.hub.coalescer
        coalescer.added += 1
        if (
            (frame is coalescer.direct_frame or (coalescer.idle and coalescer.begin_direct(frame)))
            and not self._flush_marked
            and not self._writer_running
            and not len(outbox)
            and outbox.accepting
        ):
            self._write_now(frame, ts, tracker, event_id)
            return
        if not outbox.put_nowait(frame, ts, tracker, event_id):
            self._slow_consumer()
            return
        self._schedule_flush()

    def _write_now(
        self,
        frame: bytes,
        ts: int | None,
        tracker: SentTracker | None,
        event_id: StreamId | None,
    ) -> None:
        """Write `frame` with one non-blocking send; the caller made sure
        nothing of this connection is queued or being written. What the
        socket does not take is queued (an empty outbox takes any one frame)
        for the writer task."""
        written = self.ws.try_send_nowait(frame)
        if written == len(frame):
            if ts is not None or tracker is not None:
                self._account(((frame, ts, tracker, event_id),))
            return
        self.outbox.put_nowait(frame[written:] if written else frame, ts, tracker, event_id)
        self._start_writer()

    def _schedule_flush(self) -> None:
        """Frames were queued: have the coalescer flush them at the end of
        this tick (marked once until flushed), or the writer task when the
        socket cannot take a non-blocking write; nothing when either is
        already on its way."""
        if self._flush_marked or self._writer_running:
            return
        if self.ws.can_send_nowait:
            self._flush_marked = True
            self.hub.coalescer.mark(self)
        else:
            self._start_writer()

    def _send_control(self, frame: bytes) -> None:
        """Queue a ping or pong in order with the data frames (no limits)."""
        self.outbox.put_control(frame)
        self.hub.coalescer.added += 1
        self._schedule_flush()

    def flush_ready(self) -> None:
        """Write queued frames with one non-blocking send (the coalescer calls
        this); whatever the socket does not take goes to the writer task."""
        self._flush_marked = False
        outbox = self.outbox
        if self._writer_running or not len(outbox):
            return
        batch = outbox.take_batch(FLUSH_BYTES)
        data = batch[0][0] if len(batch) == 1 else b"".join([item[0] for item in batch])
        written = self.ws.try_send_nowait(data)
        if written == len(data):
            self._account(batch)
            if len(outbox):
                self._flush_marked = True
                self.hub.coalescer.mark(self)
            return
        sent: list[Queued] = []
        for index, item in enumerate(batch):
            size = len(item[0])
            if written >= size:
                written -= size
                sent.append(item)
                continue
            rest = batch[index:]
            if written:
                rest[0] = (item[0][written:], item[1], item[2], item[3])
            outbox.push_front(rest)
            break
        self._account(sent)
        self._start_writer()

    def _account(self, batch: Sequence[Queued]) -> None:
        """Frames are on the wire: count the events for the hub's tally (its
        `commit` observes latency and delivery metrics) and move the session
        positions."""
        counts = self.hub.tally.counts
        org = self.identity.org if self.identity is not None else ""
        for _frame, event_ts, tracker, event_id in batch:
            if event_ts is not None:
                key = (org, event_ts)
                counts[key] = counts.get(key, 0) + 1
            if tracker is not None and event_id is not None:
                tracker.sent_id = event_id

    def _slow_consumer(self) -> None:
        if not self._closing:
            self.hub.metrics.slow_consumers.inc()
            stats = self.outbox.statistics()
            self.log.warning("slow_consumer", queued=stats.items, queued_bytes=stats.bytes)
        self.request_close(CloseCode.SLOW_CONSUMER, flush=False)

    def request_close(
        self, code: int, reason: str | None = None, *, flush: bool = True, by_peer: bool = False
    ) -> None:
        """Ask the connection to close with `code`; the first request wins.

        With `flush`, frames already queued (e.g. the error reply that
        explains the close) are written first, for at most FLUSH_WAIT
        seconds; without it they are dropped (slow consumer, dead peer).
        `by_peer`: the peer closed first (`code` is its own; not audited).
        """
        if self._closing:
            return
        self._flush_before_close = flush
        self.close_code = code
        try:
            default = CLOSE_REASONS[CloseCode(code)]
        except ValueError:
            default = ""
        self.close_reason = reason if reason is not None else default
        if flush:
            self.outbox.seal()
        else:
            self.outbox.close()
        self._ops.clear()  # queued commands are dropped; the running one finishes
        if self._op_room is not None:
            self._op_room.unpark_all()  # a reader waiting for queue room wakes up
        self._closing = True
        self._stop_timers()
        self._read_scope.cancel()
        if not by_peer:
            auditing.server_close(self, code, self.close_reason)

    def cut_writes_at(self, deadline: float) -> None:
        """End a (shielded) socket write still in progress at `deadline`:
        shutdown's way to stop waiting for a peer that stopped reading."""
        self.ws.set_deadline(deadline)

    @property
    def closing(self) -> bool:
        return self._closing

    # -- lifecycle -------------------------------------------------------------

    async def run(
        self, helpers: trio.Nursery, *, header_identity: Identity | None = None
    ) -> None:
        """Serve the connection until it closes; never raises for client faults.

        `helpers`: the nursery to start helper tasks in, one that outlives
        this call (the nursery this task runs in). None of them outlives
        this call: see the module docstring. A helper's error is raised here.

        Resource handling: registers with the hub's registry and removes every
        trace (router entries, org count, gauges, timer entries) in `finally`,
        and closes the socket.
        """
        hub = self.hub
        hub.registry.add(self)
        hub.metrics.connections.inc()
        hub.metrics.connections_total.inc()
        if hub.log.is_enabled_for(logging.INFO):  # skips binding a logger that drops the line
            self.log.info("connect")
        self._nursery = helpers
        try:
            self._start_timers(header_identity)
            if header_identity is not None:
                self.authenticate(header_identity)
                self.send_text(encode_push("connected", **self.auth_result()))
            with self._read_scope:
                await self._read_loop()
            await self._close()
        finally:
            self._nursery = None
            if self._helpers:
                await self._end_helpers()
            self._cleanup()
            self.ws.unlink()  # no cycle left: freed by refcounting, not the cyclic GC
            await self.ws.aclose()
        if self._crash is not None:
            crash, self._crash = self._crash, None
            raise crash

    async def _close(self) -> None:
        """The close procedure, once `request_close` was called."""
        reader_done = self._reader_done
        if reader_done is None:  # the reader was interrupted: keep reading meanwhile
            reader_done = self._reader_done = trio.Event()
            self._spawn(self._read_loop, work=False)
        if self._flush_before_close:
            with trio.move_on_after(FLUSH_WAIT):
                await self.outbox.wait_empty()
        for scope in self._work_scopes:
            scope.cancel()
        self._nursery = None  # no more helpers
        if await self._send_close():
            with trio.move_on_after(CLOSE_WAIT):
                await reader_done.wait()
            if len(self.outbox):  # our answer to the peer's close frame
                with trio.move_on_after(FLUSH_WAIT):
                    await self.outbox.wait_empty()

    async def _end_helpers(self) -> None:
        """Cancel the helpers still running and wait until they are gone,
        shielded: whatever ends the connection, it outlives none of them (a
        socket write in progress finishes, bounded by its send timeout)."""
        for scope in self._helpers:
            scope.cancel()
        with trio.CancelScope(shield=True):
            while self._helpers:
                gone = self._helpers_gone = trio.Event()
                await gone.wait()
        self._helpers_gone = None

    async def _send_close(self) -> bool:
        """Send our close frame; False when the socket is dead (no reply can come)."""
        if self.ws.broken:  # e.g. reset by the peer: the write could only fail
            return False
        code = self.close_code or CloseCode.NORMAL
        try:
            await self.ws.send_close(code, self.close_reason)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    def _cleanup(self) -> None:
        hub = self.hub
        self._closing = True
        self._stop_timers()
        hub.sessions.closed(self)  # before the subscriptions go: the final record
        hub.presence.closed(self)  # queues a leave per presence channel
        for subscription in self.subscriptions.values():
            hub.router.remove(self.org, subscription.channel, subscription)
        hub.metrics.subscriptions.dec(len(self.subscriptions))
        self.subscriptions.clear()
        hub.groups.leave_all(self)  # unacked group events go to the other members
        for watch in self.state_watches.values():
            hub.router.remove(self.org, watch.pseudo_channel, watch)
        hub.metrics.state_subscribers.dec(len(self.state_watches))
        self.state_watches.clear()
        self.outbox.close()
        self._ops.clear()
        if self._joined_org and self.identity is not None:
            hub.registry.leave_org(self.identity.org)
            self._joined_org = False
        hub.registry.discard(self)
        hub.slots.release(self.id)
        hub.directory.closed(self.id)
        hub.metrics.connections.dec()
        code = self.close_code if self.close_code is not None else 1006
        hub.metrics.count_close(code)
        if hub.log.is_enabled_for(logging.INFO):
            self.log.info(
                "close",
                code=code,
                reason=self.close_reason,
                duration=round(trio.current_time() - self.opened_at, 3),
            )

    def _spawn(self, fn: Callable[[], Awaitable[None]], *, work: bool = True) -> bool:
        """Start a helper; False once closing. `work`: the op worker or the
        writer, which the close procedure cancels before its close frame."""
        nursery = self._nursery
        if nursery is None:
            return False
        scope = trio.CancelScope()
        try:
            nursery.start_soon(self._helper, fn, scope)
        except RuntimeError:  # the nursery is already closing
            return False
        self._helpers.append(scope)
        if work:
            self._work_scopes.append(scope)
        return True

    async def _helper(self, fn: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
        """Run one helper: its cancellation stays in its scope, and its error
        ends this connection (1011) and is raised from `run`, not into the
        nursery the connection shares with others."""
        try:
            with scope:
                await fn()
        except Exception as exc:
            if self._crash is None:
                self._crash = exc
            self.request_close(CloseCode.INTERNAL_ERROR, flush=False)
        finally:
            if scope in self._work_scopes:
                self._work_scopes.remove(scope)
            self._helpers.remove(scope)
            if not self._helpers and self._helpers_gone is not None:
                self._helpers_gone.set()

    # -- reader ----------------------------------------------------------------

    async def _read_loop(self) -> None:
        """Read until the peer closes or breaks a rule; interrupted (cancelled)
        by `request_close`. Once closing, messages are read and dropped."""
        try:
            while True:
                text = await self.ws.next_message()
                if self._closing:
                    continue
                await self._on_text(text)
        except ProtocolClose as exc:
            self.request_close(exc.code, exc.reason)
        except PeerClosed as exc:
            code = exc.code if exc.code is not None else 1006
            # A close frame was answered: what was queued before it (pongs
            # to its pings included) goes out ahead of our close frame.
            self.request_close(code, exc.reason, flush=exc.answered, by_peer=True)
        if self._reader_done is None:
            self._reader_done = trio.Event()
        self._reader_done.set()

    async def _on_text(self, text: str) -> None:
        result = self.protocol.receive_text(text)
        if isinstance(result, Rejection):
            if result.code is ErrorCode.BAD_REQUEST:
                self.hub.metrics.bad_frames.inc()
            self.send_text(result.reply)
            if result.close is not None:
                self.request_close(result.close)
            return
        if self.identity is not None and not isinstance(result, Auth):
            now = trio.current_time()
            retry_after = self.bucket.try_take(now)
            if retry_after > 0:
                self.hub.metrics.rate_limited.inc()
                self.send_text(
                    encode_error(
                        result.id,
                        ErrorCode.RATE_LIMITED,
                        "too many operations",
                        retry_after=round(retry_after, 3),
                    )
                )
                auditing.rate_limited(self, now, type(result).__name__.lower())
                if self.abuse.record(now, limited=True):
                    self.request_close(CloseCode.RATE_LIMIT_ABUSE)
                return
            if self._abuse is not None:
                self._abuse.record(now, limited=False)
        await self._queue_op(result, trio.current_time())

    async def _queue_op(self, command: Command, received_at: float) -> None:
        """Hand the command to the op worker (started if none runs); waits
        while OP_QUEUE commands are already queued."""
        while len(self._ops) >= OP_QUEUE and not self._closing:
            if self._op_room is None:
                self._op_room = trio.lowlevel.ParkingLot()
            await self._op_room.park()
        if self._closing:
            return
        self._ops.append((command, received_at))
        if not self._worker_running:
            self._worker_running = self._spawn(self._op_worker)

    # -- helpers ---------------------------------------------------------------

    async def _op_worker(self) -> None:
        run_command = self.hub.commands
        ops = self._ops
        try:
            while ops:
                command, received_at = ops.pop(0)
                if self._op_room is not None:
                    self._op_room.unpark()
                self.received_at = received_at
                await run_command(self, command, received_at)
        finally:
            self._worker_running = False

    def _start_writer(self) -> None:
        if not self._writer_running and len(self.outbox):
            self._writer_running = self._spawn(self._write_loop)

    async def _write_loop(self) -> None:
        outbox = self.outbox
        try:
            while batch := outbox.take_batch():
                await self.ws.send_raw_frames(b"".join([item[0] for item in batch]))
                self._account(batch)
                self.hub.tally.commit()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.request_close(1006, "connection lost", flush=False)
        finally:
            self._writer_running = False
    # -- timers ----------------------------------------------------------------

    def _start_timers(self, header_identity: Identity | None) -> None:
        settings = self.hub.settings
        timers = self.hub.timers
        first_ping = jittered_first_ping(settings.heartbeat.interval, self.hub.rng)
        self._heartbeat_timer = timers.call_later(first_ping, self._ping_due)
        if header_identity is None:
            self._auth_timer = timers.call_later(settings.auth.timeout, self._auth_expired)

    def _stop_timers(self) -> None:
        for entry in (self._heartbeat_timer, self._auth_timer, self._token_timer):
            if entry is not None:
                entry.cancel()
        self._heartbeat_timer = self._auth_timer = self._token_timer = None

    def _ping_due(self) -> None:
        if self._closing:
            return
        self._ping_sent_at = trio.current_time()
        self._ping_counter += 1
        self._ping_payload = str(self._ping_counter).encode()
        self._send_control(self.ws.ping_frame(self._ping_payload))
        self._heartbeat_timer = self.hub.timers.call_at(
            self._ping_sent_at + self.hub.settings.heartbeat.timeout, self._pong_missing
        )

    def _on_pong(self, payload: bytes) -> None:
        if self._closing or not self._ping_payload or payload != self._ping_payload:
            return
        self._ping_payload = b""
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
        next_ping = self._ping_sent_at + self.hub.settings.heartbeat.interval
        self._heartbeat_timer = self.hub.timers.call_at(next_ping, self._ping_due)

    def _pong_missing(self) -> None:
        self._heartbeat_timer = None
        self.log.info("heartbeat_timeout")
        self.request_close(CloseCode.HEARTBEAT_TIMEOUT, flush=False)

    def _auth_expired(self) -> None:
        self._auth_timer = None
        if self.identity is None:
            self.log.info("auth_timeout")
            self.request_close(CloseCode.UNAUTHENTICATED, "authentication timeout")

    def _restart_token_timers(self) -> None:
        if self._token_timer is not None:
            self._token_timer.cancel()
            self._token_timer = None
        if self.identity is None or self._closing:
            return
        exp = self.identity.exp
        warn_in = max(0.0, exp - self.hub.settings.auth.expiry_warning - self.hub.wall())
        self._token_timer = self.hub.timers.call_later(warn_in, lambda: self._token_expiring(exp))

    def _token_expiring(self, exp: int) -> None:
        self.send_text(encode_push("token_expiring", exp=exp))
        close_in = max(0.0, exp + self.hub.settings.auth.leeway - self.hub.wall())
        self._token_timer = self.hub.timers.call_later(close_in, self._token_expired)

    def _token_expired(self) -> None:
        self._token_timer = None
        self.log.info("token_expired")
        self.request_close(CloseCode.TOKEN_EXPIRED)
