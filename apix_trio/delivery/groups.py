"""Consumer-group delivery on this node: memberships and their readers.

Theory of operation
-------------------
`GroupManager.run` is a service of the server (`await services.start(...)`)
and owns a nursery holding one `GroupReader` task (group_reader.py) per
(org, channel, group) that has members on this node. `join` creates the
group in the broker (at the channel's end, if new), then adds the
connection as a member, starting the reader when it is the first; `leave`
and `leave_all` are synchronous (a closing connection calls `leave_all`
from its cleanup) and hand the member's unacked events back through the
reader. A connection may be a member of several groups, on one channel or
many; its memberships are kept here, keyed by connection id.

`ack` is group-wide (any event pending in the group counts, whoever holds
it: a client that reconnected may ack what it processed before), but only a
member may send it; the reply counts what the broker actually acked. Acks
are coalesced per group (`acks.AckBatcher`): everything the members acked
in one tick, or while the previous batch was in flight, is one broker call.

Shutdown: when the services are cancelled, every consumer of this node is
released (bounded by `RELEASE_GRACE`, shielded), so the events members held
go to members on other nodes within a poll instead of after the visibility
timeout. A node that dies without doing this is what the visibility
timeout is for.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import trio

from apix_trio.broker.model import BrokerUnavailable
from apix_trio.delivery.acks import AckBatcher
from apix_trio.delivery.group_reader import GroupKey, GroupReader, Member
from apix_trio.delivery.ports import MemberConnection, NodeServices
from apix_trio.observability.logs import get_logger

RELEASE_GRACE = 2.0
"""Seconds a stopping node spends releasing its consumers' events."""

log = get_logger("apix.groups")


class NotAMember(LookupError):
    """The connection is not a member of that group on that channel."""


@attrs.frozen
class GroupStatistics:
    readers: int
    members: int
    in_flight: int


class GroupManager:
    """Group memberships and readers of one node. See the module docstring."""

    def __init__(self, hub: NodeServices) -> None:
        self.hub = hub
        self._readers: dict[GroupKey, GroupReader] = {}
        self._memberships: dict[str, dict[tuple[str, str], GroupKey]] = {}
        self._nursery: trio.Nursery | None = None
        self.acks = AckBatcher(lambda: self.hub.broker.groups, self._acked)

    def consumer_name(self, conn: MemberConnection) -> str:
        return f"{self.hub.settings.server.node_id}:{conn.id}"

    # -- the service -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the readers until cancelled; then release every local consumer.

        Resource handling: owns the readers' nursery; on exit (cancelled),
        releases what this node's consumers hold, shielded, for at most
        `RELEASE_GRACE` seconds.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_GRACE):
                await self._release_everything()

    async def _release_everything(self) -> None:
        groups = self.hub.broker.groups
        work = [(key, consumer) for key, r in self._readers.items() for consumer in r.consumers()]
        self._readers.clear()

        async def release(key: GroupKey, consumer: str) -> None:
            try:
                await groups.release(*key, consumer)
            except BrokerUnavailable as exc:
                log.warning("group_release_failed", consumer=consumer, error=str(exc))

        async with trio.open_nursery() as nursery:
            for key, consumer in work:
                nursery.start_soon(release, key, consumer)

    async def _serve_reader(self, reader: GroupReader) -> None:
        await reader.run()
        # Ended by itself (no member left). A cancelled reader stays listed,
        # so that `run` releases its consumers.
        if self._readers.get(reader.key) is reader:
            del self._readers[reader.key]

    # -- memberships -------------------------------------------------------------

    def is_member(self, conn: MemberConnection, channel: str, group: str) -> bool:
        return (channel, group) in self._memberships.get(conn.id, {})

    def count(self, conn: MemberConnection) -> int:
        """How many groups the connection is a member of."""
        return len(self._memberships.get(conn.id, {}))

    def memberships(self, conn: MemberConnection) -> list[tuple[str, str]]:
        """The connection's `(channel, group)` memberships, in joining order."""
        return list(self._memberships.get(conn.id, {}))

    async def join(self, conn: MemberConnection, channel: str, group: str) -> None:
        """Make `conn` a member of `group` on `channel` (a no-op if it is one).

        Creates the group in the broker first (at the channel's end, if new).
        Error handling: BrokerUnavailable from the broker (nothing changed),
        or when the manager is not running.
        """
        if self.is_member(conn, channel, group):
            return
        if self._nursery is None:
            raise BrokerUnavailable("group delivery is not running")
        key = (conn.org, channel, group)
        await self.hub.broker.groups.join(*key)
        if conn.closing or self._nursery is None or self.is_member(conn, channel, group):
            return  # closed meanwhile (its cleanup already ran), or stopping
        reader = self._readers.get(key)
        if reader is None:
            reader = GroupReader(self.hub, key)
            self._readers[key] = reader
            self._nursery.start_soon(self._serve_reader, reader)
        reader.add(Member(conn, self.consumer_name(conn)))
        self._memberships.setdefault(conn.id, {})[channel, group] = key
        conn.log.info("group_join", channel=channel, group=group)

    def leave(self, conn: MemberConnection, channel: str, group: str) -> bool:
        """End one membership; its unacked events go to the other members.
        False when it was not a member."""
        mine = self._memberships.get(conn.id)
        key = mine.pop((channel, group), None) if mine is not None else None
        if mine is not None and not mine:
            del self._memberships[conn.id]
        if key is None:
            return False
        reader = self._readers.get(key)
        if reader is not None:
            reader.remove(conn.id)
        conn.log.info("group_leave", channel=channel, group=group)
        return True

    def leave_all(self, conn: MemberConnection) -> None:
        """End every membership of `conn` (its cleanup; synchronous)."""
        for channel, group in self.memberships(conn):
            self.leave(conn, channel, group)

    async def ack(
        self, conn: MemberConnection, channel: str, group: str, ids: Sequence[str]
    ) -> int:
        """Ack `ids` on the group for member `conn`; how many were pending.

        Error handling: NotAMember when `conn` is not a member;
        BrokerUnavailable from the broker (then nothing changed here).
        """
        if not self.is_member(conn, channel, group):
            raise NotAMember(f"not a member of group {group} on {channel}")
        nursery = self._nursery
        return await self.acks.ack(
            (conn.org, channel, group), ids, nursery.start_soon if nursery is not None else None
        )

    def _acked(self, key: GroupKey, ids: list[str], count: int) -> None:
        """A batch of acks went through: free the flights, count them."""
        reader = self._readers.get(key)
        if reader is not None:
            reader.acked(ids)
        self.hub.metrics.group_acks.inc(count)

    def statistics(self) -> GroupStatistics:
        return GroupStatistics(
            readers=len(self._readers),
            members=sum(len(r.members) for r in self._readers.values()),
            in_flight=sum(r.in_flight for r in self._readers.values()),
        )
