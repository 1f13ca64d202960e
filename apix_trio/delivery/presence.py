"""Presence on this node: memberships, leaves, the node lease and reaping.

Theory of operation
-------------------
`PresenceService` (owned by the hub) keeps this node's memberships (a
connection, a channel, and its `routing.presence.PresenceWatch`) and talks to
the broker's `PresenceStore`. `PresenceService.run` is a service of the
server (`await services.start(...)`) with four tasks:

- lease keeper: the node's incarnation `<node_id>:<random>` holds a lease of
  `lease` = 2/3 of `presence.ttl`, refreshed every ttl/3. A refresh that
  finds the lease gone (Redis was unreachable for longer than the lease, so
  other nodes may have reaped our members) takes a new incarnation and joins
  every local member again: members still present are only re-tagged,
  reaped ones join again (a `leave` then a `join` for everybody else);
- reaper: every ttl/6, `reap()` removes the members of nodes whose lease
  expired, one `leave` each (atomic per channel in the store, so the
  reapers of all surviving nodes write each leave exactly once). A node
  dies at worst just after a refresh: its lease ends 2/3 ttl later and a
  reaper finds it within ttl/6 more, so its members leave within ttl;
- push flusher: the watches' pushes, coalesced per connection
  (`routing.presence.PresenceOutbox`);
- leave writer: a closing connection's cleanup is synchronous, so `closed`
  only queues its leaves; the writer writes them at once, concurrently (the
  Redis batcher pipelines them), and keeps a failed one queued for the
  next try.

Joins are awaited by the `subscribe` that makes them (`join`), and so are
the leaves of `unsubscribe` (`leave`). A join of a connection whose leave of
the same channel is still queued cancels that leave (the member simply
stays); one whose leave is being written waits for it first. So a leave
can never overtake a later join of the same connection.

On exit (services cancelled after the connections closed) the queued
leaves are written, bounded by `EXIT_GRACE`, and the lease is dropped when
nothing is left; a node that dies instead is what reaping is for.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Protocol

import attrs
import trio
from structlog.typing import FilteringBoundLogger

from apix_trio.broker.model import BrokerUnavailable
from apix_trio.broker.presence import JoinStatus, Leaver, PresenceStore, Snapshot
from apix_trio.delivery.ports import NodeServices
from apix_trio.observability.logs import get_logger
from apix_trio.protocol.ids import format_id
from apix_trio.routing.presence import (
    PRESENCE_KIND,
    PresenceOutbox,
    PresenceWatch,
    encode_presence_push,
)

EXIT_GRACE = 2.0
"""Seconds a stopping node spends writing its queued leaves."""
WRITE_BATCH = 512
"""Leaves written at once by the leave writer."""
REJOIN_CONCURRENCY = 256
RETRY_DELAY = 0.5
"""Seconds before queued leaves that failed are tried again."""

log = get_logger("apix.presence")

LeaveKey = tuple[str, str, str]
"""(org, channel, conn id)"""


class PresenceFull(Exception):
    """The channel has `presence.max_members` members (nothing was changed)."""


class PresenceConnection(Protocol):
    """A connection as presence sees it (`gateway.connection.Connection`)."""

    @property
    def id(self) -> str: ...

    @property
    def org(self) -> str: ...

    @property
    def log(self) -> FilteringBoundLogger: ...

    def enqueue_event(self, frame: bytes, ts: int | None, /) -> None: ...


@attrs.define(eq=False)
class _Membership:
    watch: PresenceWatch
    sub: str
    info: str | None


@attrs.frozen
class PresenceJoin:
    """A join's snapshot, and what to call right after the reply is queued."""

    snapshot: Snapshot
    go_live: Callable[[], None]


def new_incarnation(node_id: str) -> str:
    return f"{node_id}:{secrets.token_hex(4)}"


class PresenceService:
    """See the module docstring."""

    def __init__(self, node: NodeServices) -> None:
        settings = node.settings.presence
        self._node = node
        self.ttl = settings.ttl
        self.max_members = settings.max_members
        self.lease = settings.ttl * 2 / 3
        self.refresh_interval = settings.ttl / 3
        self.reap_interval = settings.ttl / 6
        self.incarnation = new_incarnation(node.settings.server.node_id)
        self._members: dict[PresenceConnection, dict[str, _Membership]] = {}
        self._leaves: dict[LeaveKey, None] = {}
        """Queued leaves, oldest first."""
        self._writing: dict[LeaveKey, trio.Event] = {}
        """Leaves being written, set when done."""
        self._wake = trio.Event()
        self._rejoin_needed = False
        self.outbox = PresenceOutbox()
        node.router.set_internal_encoder(PRESENCE_KIND, encode_presence_push)

    @property
    def store(self) -> PresenceStore:
        return self._node.broker.presence

    def memberships(self, conn: PresenceConnection) -> list[str]:
        """The channels `conn` is a member of (on this node)."""
        return list(self._members.get(conn, ()))

    def is_member(self, conn: PresenceConnection, channel: str) -> bool:
        return channel in self._members.get(conn, {})

    @property
    def queued_leaves(self) -> int:
        return len(self._leaves) + len(self._writing)

    # -- joins and leaves of connections ------------------------------------------------

    async def join(
        self, conn: PresenceConnection, channel: str, *, sub: str, info: str | None
    ) -> PresenceJoin:
        """Make `conn` a member of `channel` and read the snapshot (see
        `routing.presence` for the seam); call `go_live` after the reply.

        Joining again is allowed (one member; a fresh snapshot).

        Error handling: PresenceFull when the channel is full (nothing
        changed); BrokerUnavailable (a join that may have been made is
        undone by a queued leave, unless `conn` was a member already).
        """
        org = conn.org
        memberships = self._members.setdefault(conn, {})
        existing = memberships.get(channel)
        watch = (
            existing.watch if existing is not None else PresenceWatch(conn, channel, self.outbox)
        )
        router = self._node.router
        if existing is None:
            router.add(org, watch.pseudo_channel, watch)
        watch.park()
        key = (org, channel, conn.id)
        sent = False
        try:
            self._leaves.pop(key, None)  # not written yet: the member just stays
            while (writing := self._writing.get(key)) is not None:
                await writing.wait()
            sent = True
            outcome = await self.store.join(
                org,
                channel,
                node=self.incarnation,
                conn=conn.id,
                sub=sub,
                info=info,
                max_members=self.max_members,
            )
            if outcome.status is JoinStatus.FULL:
                sent = False
                raise PresenceFull(channel)
            snapshot = await self.store.members(org, channel, self.max_members)
        except BaseException:
            if existing is None:
                router.remove(org, watch.pseudo_channel, watch)
                watch.stop()
                if not memberships:
                    del self._members[conn]
                if sent:
                    self._queue_leave(key)
            else:
                watch.go_live(format_id(watch.last))
            raise
        if existing is None:
            memberships[channel] = _Membership(watch, sub, info)
            self._node.metrics.presence_members.inc()
        if outcome.status is JoinStatus.JOINED:
            self._node.metrics.presence_joins.inc()
            conn.log.debug("presence_join", channel=channel)
        return PresenceJoin(snapshot, lambda: watch.go_live(snapshot.position))

    async def leave(self, conn: PresenceConnection, channel: str) -> None:
        """`unsubscribe`: stop watching and leave now (queued if the backend
        fails: the writer retries). No-op for a non-member."""
        if self._forget(conn, channel):
            key = (conn.org, channel, conn.id)
            self._writing[key] = done = trio.Event()
            await self._write(key, done)

    def dropped(self, conn: PresenceConnection, channel: str) -> None:
        """A subscription went away without an await (its subscribe failed):
        queue its leave."""
        if self._forget(conn, channel):
            self._queue_leave((conn.org, channel, conn.id))

    def closed(self, conn: PresenceConnection) -> None:
        """The connection is gone (its synchronous cleanup): queue a leave
        for every channel it is a member of."""
        for channel in self.memberships(conn):
            self.dropped(conn, channel)

    async def evict(self, org: str, channel: str, conn_id: str) -> None:
        """Remove another connection's membership, wherever it is held (a
        resumed session's previous connection). Error handling:
        BrokerUnavailable."""
        leaver = await self.store.leave(org, channel, conn_id)
        if leaver is not None:
            self._counted_leave(org, channel, leaver)

    def _forget(self, conn: PresenceConnection, channel: str) -> bool:
        memberships = self._members.get(conn)
        membership = memberships.pop(channel, None) if memberships else None
        if membership is None:
            return False
        if not memberships:
            del self._members[conn]
        self._node.router.remove(conn.org, membership.watch.pseudo_channel, membership.watch)
        membership.watch.stop()
        self._node.metrics.presence_members.dec()
        return True

    def _queue_leave(self, key: LeaveKey) -> None:
        self._leaves[key] = None
        self._wake.set()

    async def _write(self, key: LeaveKey, done: trio.Event) -> bool:
        """Write one leave whose `_writing` marker is set; a failure queues
        it again before the marker goes (so no join slips in between).
        False when it failed."""
        try:
            leaver = await self.store.leave(*key)
        except BrokerUnavailable as exc:
            log.warning("presence_leave_failed", org=key[0], channel=key[1], error=str(exc))
            self._queue_leave(key)
            return False
        except BaseException:
            self._queue_leave(key)  # cancelled (shutting down): the exit flush writes it
            raise
        finally:
            del self._writing[key]
            done.set()
        if leaver is not None:
            self._counted_leave(key[0], key[1], leaver)
        return True

    def _counted_leave(self, org: str, channel: str, leaver: Leaver) -> None:
        self._node.metrics.presence_leaves.inc()
        log.debug("presence_leave", org=org, channel=channel, node=leaver.node)

    async def flush(self) -> None:
        """Write every leave queued now (one attempt each) and wait for those
        being written."""
        await self._write_batch(len(self._leaves))
        while self._writing:
            await next(iter(self._writing.values())).wait()

    async def _write_batch(self, limit: int) -> int:
        """Write up to `limit` queued leaves at once; how many failed."""
        batch: list[tuple[LeaveKey, trio.Event]] = []
        while self._leaves and len(batch) < limit:
            key = next(iter(self._leaves))
            del self._leaves[key]
            self._writing[key] = done = trio.Event()  # before any checkpoint
            batch.append((key, done))
        failed = 0

        async def write(key: LeaveKey, done: trio.Event) -> None:
            nonlocal failed
            if not await self._write(key, done):
                failed += 1

        async with trio.open_nursery() as nursery:
            for key, done in batch:
                nursery.start_soon(write, key, done)
        return failed

    # -- the service ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the lease, reap, write leaves; never returns (cancel it).

        Resource handling: on cancellation, writes the queued leaves and
        drops the lease (shielded, at most EXIT_GRACE seconds)."""
        registered = await self._register()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_lease, registered)
                nursery.start_soon(self._reap_forever)
                nursery.start_soon(self._write_forever)
                nursery.start_soon(self.outbox.serve)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(EXIT_GRACE):
                await self.flush()
                if not self._members and not self._leaves:
                    try:
                        await self.store.forget_node(self.incarnation)
                    except BrokerUnavailable as exc:
                        log.warning("presence_forget_failed", error=str(exc))

    async def _register(self) -> bool:
        try:
            await self.store.register_node(self.incarnation, self.lease)
        except BrokerUnavailable as exc:
            log.warning("presence_lease_failed", node=self.incarnation, error=str(exc))
            return False
        return True

    async def _keep_lease(self, registered: bool) -> None:
        while True:
            await trio.sleep(self.refresh_interval)
            try:
                live = registered and await self.store.refresh_node(self.incarnation, self.lease)
            except BrokerUnavailable as exc:
                log.warning("presence_lease_failed", node=self.incarnation, error=str(exc))
                continue
            if not live:
                if registered:
                    log.warning("presence_lease_lost", node=self.incarnation)
                self.incarnation = new_incarnation(self._node.settings.server.node_id)
                registered = await self._register()
                self._rejoin_needed = True
            if self._rejoin_needed and registered:
                self._rejoin_needed = not await self._rejoin_all()

    async def _rejoin_all(self) -> bool:
        """Join every local member again under the current incarnation; True
        when all of them made it."""
        ok = True
        limiter = trio.CapacityLimiter(REJOIN_CONCURRENCY)

        async def rejoin(conn: PresenceConnection, channel: str, membership: _Membership) -> None:
            nonlocal ok
            async with limiter:
                try:
                    outcome = await self.store.join(
                        conn.org,
                        channel,
                        node=self.incarnation,
                        conn=conn.id,
                        sub=membership.sub,
                        info=membership.info,
                        max_members=self.max_members,
                    )
                except BrokerUnavailable:
                    ok = False
                    return
            if outcome.status is JoinStatus.JOINED:
                self._node.metrics.presence_joins.inc()
            elif outcome.status is JoinStatus.FULL:
                conn.log.warning("presence_rejoin_full", channel=channel)

        async with trio.open_nursery() as nursery:
            for conn, memberships in list(self._members.items()):
                for channel, membership in memberships.items():
                    nursery.start_soon(rejoin, conn, channel, membership)
        log.info("presence_rejoined", node=self.incarnation, ok=ok)
        return ok

    async def _reap_forever(self) -> None:
        while True:
            await trio.sleep(self.reap_interval)
            try:
                reaped = await self.store.reap()
            except BrokerUnavailable as exc:
                log.warning("presence_reap_failed", error=str(exc))
                continue
            if reaped:
                self._node.metrics.presence_leaves.inc(len(reaped))
                log.info("presence_reaped", members=len(reaped))

    async def _write_forever(self) -> None:
        while True:
            while not self._leaves:
                await self._wake.wait()
                self._wake = trio.Event()
            if await self._write_batch(WRITE_BATCH):
                await trio.sleep(RETRY_DELAY)  # the backend is down: try again soon
