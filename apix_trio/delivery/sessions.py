"""Sessions on the server side: keeping records of live connections, and resume.

Theory of operation
-------------------
Every authenticated connection has a session (`Connection.session`). The
node's `SessionKeeper` tracks them and writes their records
(`broker.sessions.SessionRecord`: subscriptions and per channel the last id
sent, and the subscribed state keys) to the broker's `SessionStore`:

- on subscribe and unsubscribe, before the reply (`save_now`), so a
  subscription the client was told about survives a crash of this node the
  moment after;
- periodically (`FLUSH_INTERVAL`, at most `ttl / 3`), batched across every
  connection with `save_many`: records whose content changed since their last
  save, and unchanged ones whose expiry needs pushing back (`ttl / 3` after
  their last save). Positions in the store are therefore at most one interval
  stale; nothing is written per event;
- on disconnect: cleanup is synchronous, so `closed` builds the final record
  there and queues it; the keeper's task flushes queued finals at once, in
  batches (more that queue while a flush runs go in the next);
- on graceful shutdown, `server.serve` calls `flush` before it closes the
  connections with 1001 and again after they are gone (the finals).

A write that fails (the backend is down) is logged and retried by the next
flush; it never fails a subscribe or closes a connection.

Resume (`commands.resume`: `load_session`, then `resume_session`): the record is loaded with the
connection's own org in the key (a session of another org is simply not
found) and must have the token's `sub`; otherwise `resumed: false`, a fresh
session, and a reply that is the same whatever the reason. The resumed
connection takes the session id over with the record's `epoch + 1`, which
fences off any connection still holding the session elsewhere (see
`broker.sessions`), and saves at once. Its subscriptions are then restored
one by one through the `subscribe` handler itself (permissions are checked
against the new token, replay after the position comes first), the client's
positions taking precedence over the server's. Until a channel is restored
it is "carried": kept in every record saved meanwhile, so a node dying in the
middle of a resume loses nothing; state keys are carried the same way until
`commands.state.restore_state` has watched them again. All channels stay parked (their live events
held back) until every replay is done and the reply is queued; then each goes
live in turn. Replays are paged and wait for outbox room
(`subscriptions.REPLAY_SHARE`), so a huge catch-up is paced by the client's
reading, not by a timeout: the restore runs after the op timeout (`ops.Later`).

Positions: `ChannelSubscription.sent_id` moves when the writer has put an
event on the socket. A client that resumes with its own positions gets every
event exactly once per channel (within retention). With the server's
positions alone, two things can differ: after a crash the stored positions
may be up to one flush behind (events sent since then come again), and
events written to the socket but never read by the client (the connection
broke with them in flight) count as sent and are not replayed.
"""

from __future__ import annotations

import math

import attrs
import trio

from apix_trio.broker.events import Broker
from apix_trio.broker.model import BrokerUnavailable
from apix_trio.broker.sessions import SessionChannel, SessionRecord, SessionStore
from apix_trio.delivery.ports import SessionConnection
from apix_trio.observability.logs import get_logger
from apix_trio.protocol.ids import ZERO_TEXT, format_id

FLUSH_INTERVAL = 5.0
"""Seconds between periodic flushes (at most `sessions.ttl / 3`)."""
SAVE_CHUNK = 1000
"""Records per `save_many` call of a flush."""
RECORDS_PER_CHECKPOINT = 500
"""Live records a flush builds between two checkpoints."""

log = get_logger("apix.sessions")

_FinalKey = tuple[str, str]
_ChannelKey = tuple[str, str | None]


@attrs.define(eq=False)
class _Tracked:
    """What the keeper knows about one live connection's session."""

    epoch: int = 0
    carried: dict[_ChannelKey, SessionChannel] = attrs.Factory(dict)
    """Channels of a resumed record not restored yet."""
    carried_state: dict[str, None] = attrs.Factory(dict)
    """State keys of a resumed record not restored yet (in record order)."""
    restoring: bool = False
    fenced: bool = False
    """A newer connection took the session over: stop writing."""
    saved: SessionRecord | None = None
    saved_at: float = -math.inf


@attrs.frozen
class SessionKeeperStatistics:
    live: int
    pending_finals: int
    saved: int
    """Records written (fenced-off writes included)."""
    failures: int
    """Writes that failed (each is retried by a later flush)."""


class SessionKeeper:
    """The node's sessions (see the module docstring). Owned by the `Hub`;
    its task (`serve`) runs in the server's services nursery.

    With no store (a broker without sessions) it tracks nothing and every
    resume answers `resumed: false`.
    """

    def __init__(
        self, store: SessionStore | None, ttl: float, *, flush_interval: float = FLUSH_INTERVAL
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.interval = min(flush_interval, ttl / 3)
        self._refresh_after = ttl / 3
        self._live: dict[SessionConnection, _Tracked] = {}
        self._by_session: dict[_FinalKey, SessionConnection] = {}
        self._finals: dict[_FinalKey, tuple[SessionRecord, float]] = {}
        """Final records waiting for a flush, with when they were queued."""
        self._wake = trio.Event()
        self._flush_lock = trio.Lock()
        self._saved = 0
        self._failures = 0

    @classmethod
    def for_broker(cls, broker: Broker, ttl: float) -> SessionKeeper:
        """A keeper on the broker's session store (none if it has none)."""
        try:
            store: SessionStore | None = broker.sessions
        except NotImplementedError:
            store = None
        return cls(store, ttl)

    def statistics(self) -> SessionKeeperStatistics:
        return SessionKeeperStatistics(
            live=len(self._live),
            pending_finals=len(self._finals),
            saved=self._saved,
            failures=self._failures,
        )

    # -- connections (synchronous hooks) --------------------------------------

    def opened(self, conn: SessionConnection) -> None:
        """`conn` authenticated with a fresh session: keep its record from now on."""
        if self.store is None:
            return
        self._live[conn] = _Tracked()
        self._by_session[(conn.org, conn.session)] = conn

    def closed(self, conn: SessionConnection) -> None:
        """`conn` is going away (called from its synchronous cleanup, while its
        subscriptions are still there): queue its final record for the next
        flush, which the keeper's task starts at once."""
        tracked = self._live.pop(conn, None)
        if tracked is None:
            return
        key = (conn.org, conn.session)
        if self._by_session.get(key) is conn:
            del self._by_session[key]
        if tracked.fenced:
            return
        record = self.record(conn, tracked)
        queued = self._finals.get(key)
        if queued is None or queued[0].epoch <= record.epoch:
            self._finals[key] = (record, trio.current_time())
        self._wake.set()

    def record(self, conn: SessionConnection, tracked: _Tracked | None = None) -> SessionRecord:
        """The connection's session record as of now."""
        tracked = tracked or self._live.get(conn) or _Tracked()
        channels = dict(tracked.carried)
        for subscription in conn.subscriptions.values():
            if not subscription.positioned:
                continue  # still reading where it starts: not confirmed yet
            channels[(subscription.channel, None)] = SessionChannel(
                channel=subscription.channel,
                position=format_id(subscription.sent_id),
                presence=bool(getattr(subscription, "presence", False)),
            )
        for channel, group in conn.group_memberships():
            # A group keeps its own delivery state: no position to remember.
            channels[(channel, group)] = SessionChannel(channel, ZERO_TEXT, group=group)
        state = tuple({**tracked.carried_state, **dict.fromkeys(conn.state_watches)})
        return SessionRecord(
            conn.session,
            conn.sub,
            channels=tuple(channels.values()),
            epoch=tracked.epoch,
            conn=conn.id,
            state=state,
        )

    # -- resume ------------------------------------------------------------------

    async def load(self, org: str, session: str) -> SessionRecord | None:
        """The freshest record of (org, session): a live connection's or a
        queued final on this node, or the store's, whichever has the highest
        epoch (this node's on a tie: it is at least as fresh).

        Error handling: BrokerUnavailable from the store.
        """
        if self.store is None:
            return None
        stored = await self.store.load(org, session)
        key = (org, session)
        local = self._final(key)
        holder = self._by_session.get(key)
        if holder is not None and holder in self._live:
            live = self.record(holder)
            if local is None or live.epoch >= local.epoch:
                local = live
        if local is not None and (stored is None or local.epoch >= stored.epoch):
            return local
        return stored

    def _final(self, key: _FinalKey) -> SessionRecord | None:
        """A queued final record, unless it is older than the TTL (the store
        was down all along: the session expired anyway)."""
        queued = self._finals.get(key)
        if queued is None:
            return None
        record, queued_at = queued
        if trio.current_time() - queued_at >= self.ttl:
            del self._finals[key]
            return None
        return record

    def adopt(
        self, conn: SessionConnection, record: SessionRecord, positions: dict[str, str]
    ) -> None:
        """`conn` resumes `record`: it takes over the session id with the next
        epoch, and carries the record's channels until they are restored,
        positions given by the client first."""
        tracked = self._live.setdefault(conn, _Tracked())
        old_key = (conn.org, conn.session)
        if self._by_session.get(old_key) is conn:
            del self._by_session[old_key]
        conn.session = record.session
        self._by_session[(conn.org, conn.session)] = conn
        tracked.epoch = record.epoch + 1
        tracked.restoring = True
        tracked.carried = {
            (channel.channel, channel.group): attrs.evolve(
                channel, position=positions.get(channel.channel, channel.position)
            )
            for channel in record.channels
        }
        tracked.carried_state = dict.fromkeys(record.state)

    def carried(self, conn: SessionConnection) -> list[SessionChannel]:
        """The channels `conn` still has to restore, in record order."""
        tracked = self._live.get(conn)
        return list(tracked.carried.values()) if tracked is not None else []

    def restored(self, conn: SessionConnection, channel: SessionChannel) -> None:
        """One carried channel is restored (or refused): stop carrying it."""
        tracked = self._live.get(conn)
        if tracked is not None:
            tracked.carried.pop((channel.channel, channel.group), None)

    def carried_state(self, conn: SessionConnection) -> list[str]:
        """The state keys `conn` still has to restore, in record order."""
        tracked = self._live.get(conn)
        return list(tracked.carried_state) if tracked is not None else []

    def restored_state(self, conn: SessionConnection, key: str) -> None:
        """One carried state key is restored (or refused): stop carrying it."""
        tracked = self._live.get(conn)
        if tracked is not None:
            tracked.carried_state.pop(key, None)

    def restore_done(self, conn: SessionConnection) -> None:
        tracked = self._live.get(conn)
        if tracked is not None:
            tracked.restoring = False

    # -- writing -------------------------------------------------------------

    async def save_now(self, conn: SessionConnection, *, force: bool = False) -> None:
        """Write the connection's record now (subscribe, unsubscribe, resume).

        Skipped while a resume restores (it saves once at the start, with
        `force`, and once at the end). Error handling: never raises for the
        backend; a failed write is logged and left to the next flush.
        """
        tracked = self._live.get(conn)
        if self.store is None or tracked is None or tracked.fenced:
            return
        if tracked.restoring and not force:
            return
        record = self.record(conn, tracked)
        try:
            stored = await self.store.save(conn.org, record, self.ttl)
        except BrokerUnavailable as exc:
            self._failures += 1
            conn.log.warning("session_save_failed", error=str(exc))
            return
        self._saved += 1
        tracked.saved, tracked.saved_at = record, trio.current_time()
        if not stored:
            tracked.fenced = True
            conn.log.info("session_taken_over", session=conn.session)

    async def flush(self) -> int:
        """Write every queued final record and every live record that changed
        or is due for an expiry refresh; returns how many were written. On
        return, everything queued before the call is written (a flush already
        running is waited for first).

        Error handling: never raises for the backend; what failed stays
        queued (finals) or due (live records) for the next flush.
        """
        async with self._flush_lock:
            return await self._flush()

    async def _flush(self) -> int:
        store = self.store
        if store is None:
            return 0
        now = trio.current_time()
        finals, self._finals = self._finals, {}
        due: list[tuple[_Tracked, SessionRecord]] = []
        items = [
            (org, record)
            for (org, _), (record, queued_at) in finals.items()
            if now - queued_at < self.ttl
        ]
        for n, (conn, tracked) in enumerate(list(self._live.items()), 1):
            if n % RECORDS_PER_CHECKPOINT == 0:
                await trio.lowlevel.checkpoint()  # many connections: let others run
            if tracked.fenced or conn not in self._live:
                continue
            record = self.record(conn, tracked)
            if record != tracked.saved or now - tracked.saved_at >= self._refresh_after:
                due.append((tracked, record))
                items.append((conn.org, record))
        written = 0
        try:
            for start in range(0, len(items), SAVE_CHUNK):
                written += await store.save_many(items[start : start + SAVE_CHUNK], self.ttl)
        except BrokerUnavailable as exc:
            self._failures += 1
            log.warning("session_flush_failed", error=str(exc), records=len(items))
            for key, queued in finals.items():
                self._finals.setdefault(key, queued)  # a newer final wins
            return written
        self._saved += len(items)
        for tracked, record in due:
            tracked.saved, tracked.saved_at = record, now
        return written

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush every `interval`, and at once when final records are queued.
        Never returns; cancel it (after a last `flush` on shutdown)."""
        task_status.started()
        while True:
            with trio.move_on_after(self.interval):
                await self._wake.wait()
            self._wake = trio.Event()
            await self.flush()
