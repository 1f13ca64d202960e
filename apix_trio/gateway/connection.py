"""One WebSocket connection: its nursery, its tasks, its close.

Theory of operation
-------------------
`Connection.run` owns the connection's nursery:

- reader: the only task that reads the socket. It decodes frames through the
  sans-IO `ServerProtocol`, answers what needs no I/O (bad frames,
  unauthenticated ops, rate limits) and queues commands for the op worker; it
  never waits on the broker, so pings and close frames keep flowing.
- work scope (cancelled first on close), a child nursery with:
  - writer: outbox -> socket, a batch per write;
  - op worker: runs commands one at a time, in arrival order, so one
    client's publishes are stored in the order it sent them;
  - heartbeat: ping every `heartbeat.interval`, close 4008 without a pong;
  - auth timer, then token timers (warn before `exp`, close 4003 after it).

Any task may call `request_close(code)`: it is synchronous, idempotent and
the first call wins. The nursery body then cancels the work scope (a socket
write in progress finishes, bounded by the send timeout), sends the close
frame, waits a moment for the peer's close (unless the socket is dead), and
cancels the reader. Cleanup
(router, registry, metrics) is synchronous in `finally`, so a cancelled
connection leaves nothing behind.
"""

from __future__ import annotations

import itertools
import secrets

import trio

from apix_trio.auth.identity import Identity
from apix_trio.auth.permissions import Permissions
from apix_trio.delivery.backoff import jittered_first_ping
from apix_trio.gateway import auditing
from apix_trio.gateway.hub import Hub
from apix_trio.gateway.outbox import Outbox
from apix_trio.gateway.ratelimit import AbuseTracker, TokenBucket
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


def new_connection_id() -> str:
    return secrets.token_hex(8)


class Connection:
    """See the module docstring."""

    def __init__(self, hub: Hub, ws: ServerWebSocket, *, conn_id: str | None = None) -> None:
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
        self.abuse = AbuseTracker()
        self.close_code: int | None = None
        self.close_reason = ""
        self.opened_at = trio.current_time()
        self.peer = auditing.peer_address(ws.stream)  # the audit trail's `ip`
        self.claimed: tuple[str, str] | None = None  # org/sub of a verified token refused later
        self.received_at = 0.0  # arrival of the command the op worker runs
        self._closing = trio.Event()
        self._authenticated = trio.Event()
        self._reader_done = trio.Event()
        self._pong = trio.Event()
        self._ping_payload = b""
        self._ping_counter = itertools.count(1)
        # Commands with the trio time they arrived: the `unavailable` bound
        # counts from arrival, not from when the op worker gets to them.
        self._ops_send, self._ops_recv = trio.open_memory_channel[tuple[Command, float]](OP_QUEUE)
        self.backend_failed = False  # the last broker call of this connection failed
        self._work_nursery: trio.Nursery | None = None
        self._token_scope: trio.CancelScope | None = None
        self._joined_org = False
        self._flush_before_close = True
        self.log = hub.log.bind(conn=self.id)
        ws.on_pong = self._on_pong

    # -- identity --------------------------------------------------------------

    @property
    def org(self) -> str:
        assert self.identity is not None
        return self.identity.org

    @property
    def sub(self) -> str:
        assert self.identity is not None
        return self.identity.sub

    def authenticate(self, identity: Identity) -> None:
        """Adopt `identity` (the caller has taken its connection slot)."""
        self.hub.registry.try_join_org(identity.org, 0)
        self._joined_org = True
        self.identity = identity
        self.permissions = Permissions.from_identity(identity)
        self.session = secrets.token_urlsafe(12)
        self.protocol.mark_authenticated()
        self.log = self.log.bind(org=identity.org, sub=identity.sub)
        self._authenticated.set()
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
        """Send or queue a reply or push; a full outbox closes the connection (4009)."""
        if not self._deliver(text_frame_str(text), None, None, None):
            self._slow_consumer()

    def enqueue_event(
        self,
        frame: bytes,
        ts: int | None,
        tracker: SentTracker | None = None,
        event_id: StreamId | None = None,
    ) -> None:
        """Send or queue an event frame; `tracker.sent_id` becomes `event_id`
        once written. `ts` None: not an event (a presence push), so it is
        neither counted as delivered nor timed."""
        if not self._deliver(frame, ts, tracker, event_id):
            self._slow_consumer()

    def _deliver(
        self,
        frame: bytes,
        ts: int | None,
        tracker: SentTracker | None,
        event_id: StreamId | None,
    ) -> bool:
        """Write the frame at once when nothing is queued and the socket takes
        it (no task switch, no lock: the common case for a reader that keeps
        up), else queue it (the rest of it, after a partial write) for the
        writer. False when the outbox is full."""
        outbox = self.outbox
        if not len(outbox) and outbox.accepting:
            written = self.ws.try_send_nowait(frame)
            if written == len(frame):
                if ts is not None:
                    self.hub.metrics.latency.observe(self.hub.wall() * 1000 - ts)
                    self.hub.latency.delivered(self.org, ts)
                    self.hub.metrics.delivered.inc()
                if tracker is not None and event_id is not None:
                    tracker.sent_id = event_id
                return True
            if written:
                frame = frame[written:]
        return outbox.put_nowait(frame, ts, tracker, event_id)

    def _slow_consumer(self) -> None:
        if not self._closing.is_set():
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
        if self._closing.is_set():
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
        self._ops_recv.close()  # a reader blocked on a full op queue wakes up
        self._closing.set()
        if not by_peer:
            auditing.server_close(self, code, self.close_reason)

    def cut_writes_at(self, deadline: float) -> None:
        """End a (shielded) socket write still in progress at `deadline`:
        shutdown's way to stop waiting for a peer that stopped reading."""
        self.ws.set_deadline(deadline)

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    # -- lifecycle -------------------------------------------------------------

    async def run(self, *, header_identity: Identity | None = None) -> None:
        """Serve the connection until it closes; never raises for client faults.

        Resource handling: registers with the hub's registry and removes every
        trace (router entries, org count, gauges) in `finally`, and closes the
        socket.
        """
        hub = self.hub
        hub.registry.add(self)
        hub.metrics.connections.inc()
        hub.metrics.connections_total.inc()
        self.log.info("connect")
        try:
            if header_identity is not None:
                self.authenticate(header_identity)
                self.send_text(encode_push("connected", **self.auth_result()))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_loop)
                work = trio.CancelScope()
                nursery.start_soon(self._work, work)
                await self._closing.wait()
                if self._flush_before_close:
                    with trio.move_on_after(FLUSH_WAIT):
                        await self.outbox.wait_empty()
                work.cancel()
                if await self._send_close():
                    with trio.move_on_after(CLOSE_WAIT):
                        await self._reader_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._cleanup()
            await self.ws.aclose()

    async def _send_close(self) -> bool:
        """Send our close frame; False when the socket is dead (no reply can come)."""
        code = self.close_code or CloseCode.NORMAL
        try:
            await self.ws.send_close(code, self.close_reason)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    def _cleanup(self) -> None:
        hub = self.hub
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
        self._ops_send.close()
        self._ops_recv.close()
        if self._joined_org and self.identity is not None:
            hub.registry.leave_org(self.identity.org)
            self._joined_org = False
        hub.registry.discard(self)
        hub.slots.release(self.id)
        hub.directory.closed(self.id)
        hub.metrics.connections.dec()
        code = self.close_code if self.close_code is not None else 1006
        hub.metrics.closes.labels(code=str(code)).inc()
        self.log.info(
            "close",
            code=code,
            reason=self.close_reason,
            duration=round(trio.current_time() - self.opened_at, 3),
        )

    async def _work(self, scope: trio.CancelScope) -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                self._work_nursery = nursery
                nursery.start_soon(self._write_loop)
                nursery.start_soon(self._op_loop)
                nursery.start_soon(self._heartbeat)
                if self.identity is None:
                    nursery.start_soon(self._auth_timer)
                elif self._token_scope is None:
                    self._restart_token_timers()

    # -- reader ----------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                text = await self.ws.next_message()
                if self._closing.is_set():
                    continue
                await self._on_text(text)
        except ProtocolClose as exc:
            self.request_close(exc.code, exc.reason)
        except PeerClosed as exc:
            code = exc.code if exc.code is not None else 1006
            self.request_close(code, exc.reason, flush=False, by_peer=True)
        finally:
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
            self.abuse.record(now, limited=False)
        try:
            await self._ops_send.send((result, trio.current_time()))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    # -- op worker -------------------------------------------------------------

    async def _op_loop(self) -> None:
        run_command = self.hub.commands
        try:
            async for command, received_at in self._ops_recv:
                self.received_at = received_at
                await run_command(self, command, received_at)
        except trio.ClosedResourceError:
            return  # request_close closed the queue

    # -- writer ----------------------------------------------------------------

    async def _write_loop(self) -> None:
        metrics = self.hub.metrics
        latency = metrics.latency
        org_latency = self.hub.latency
        try:
            while True:
                batch = await self.outbox.get_batch()
                await self.ws.send_raw_frames(b"".join(item.frame for item in batch))
                now_ms = self.hub.wall() * 1000
                events = 0
                for item in batch:
                    if item.event_ts is not None:
                        latency.observe(now_ms - item.event_ts)
                        org_latency.delivered(self.org, item.event_ts, now_ms)
                        events += 1
                    if item.tracker is not None and item.event_id is not None:
                        item.tracker.sent_id = item.event_id
                if events:
                    metrics.delivered.inc(events)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.request_close(1006, "connection lost", flush=False)

    # -- timers ----------------------------------------------------------------

    def _on_pong(self, payload: bytes) -> None:
        if payload == self._ping_payload:
            self._pong.set()

    async def _heartbeat(self) -> None:
        settings = self.hub.settings.heartbeat
        await trio.sleep(jittered_first_ping(settings.interval, self.hub.rng))
        while True:
            sent_at = trio.current_time()
            self._pong = trio.Event()
            self._ping_payload = str(next(self._ping_counter)).encode()
            try:
                await self.ws.send_ping(self._ping_payload)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.request_close(1006, "connection lost", flush=False)
                return
            with trio.move_on_after(settings.timeout):
                await self._pong.wait()
            if not self._pong.is_set():
                self.log.info("heartbeat_timeout")
                self.request_close(CloseCode.HEARTBEAT_TIMEOUT, flush=False)
                return
            await trio.sleep_until(sent_at + settings.interval)

    async def _auth_timer(self) -> None:
        with trio.move_on_after(self.hub.settings.auth.timeout):
            await self._authenticated.wait()
            return
        self.log.info("auth_timeout")
        self.request_close(CloseCode.UNAUTHENTICATED, "authentication timeout")

    def _restart_token_timers(self) -> None:
        if self._token_scope is not None:
            self._token_scope.cancel()
        if self._work_nursery is None or self.identity is None:
            self._token_scope = None
            return
        scope = trio.CancelScope()
        self._token_scope = scope
        self._work_nursery.start_soon(self._token_timers, scope, self.identity.exp)

    async def _token_timers(self, scope: trio.CancelScope, exp: int) -> None:
        auth = self.hub.settings.auth
        with scope:
            warn_in = exp - auth.expiry_warning - self.hub.wall()
            if warn_in > 0:
                await trio.sleep(warn_in)
            self.send_text(encode_push("token_expiring", exp=exp))
            close_in = exp + auth.leeway - self.hub.wall()
            if close_in > 0:
                await trio.sleep(close_in)
            self.log.info("token_expired")
            self.request_close(CloseCode.TOKEN_EXPIRED)
