"""Presence: who is on a channel, visible on every node.

The interface; the embedded implementation lives in `memory/presence.py`,
the Redis one in `redis/presence.py`. One contract suite
(`tests/test_presence_contract.py`) runs against both.

Theory of operation
-------------------
A channel's presence is a set of members keyed by connection id. A member is
the wire object `{"sub", "conn", "since", "info"?}` (`since`: unix ms of the
join, the backend's clock), kept as compact JSON text, plus the *node* that
holds the connection (never shown to clients).

Every change (a join of a new connection, a leave of a present one) gets
the channel's next presence *position*, a stream id `<ms>-<seq>` made like
an event id (strictly greater than every position the channel had, also
after it emptied and was forgotten), and, in the same atomic step, goes out
through the broker's ordinary fan-out as an event of the internal
pseudo-channel `presence_channel(channel)` = `$presence.<channel>` (no
client channel name can contain `$`, so no client can subscribe or publish
to it). That event is:

    id    the position           (the router's per-channel order is change order)
    ts    unix ms of the change (the position's ms)
    from  the member's sub
    key   the member's conn      (a subscriber drops its own changes cheaply)
    data  {"join": member} or {"leave": member}   (JSON text)

A channel without members keeps only its last position, for
`model.TOMBSTONE_GRACE` (a day) after it emptied; then it is forgotten, and
new positions still exceed the old ones because their ms come from the
clock (unless it went back by more than a day).

A join of a connection that is already a member changes nothing and sends
nothing (re-tagging it with the caller's node, see below). A leave of a
connection that is not a member sends nothing. So every member has exactly
one `join` and at most one `leave` event, whoever triggers it.

`presence.max_members` is checked in the same atomic step as the join: a
channel never has more members than the limit the joins were given.

Node leases and reaping: a node names itself with an *incarnation*
(`<node_id>:<random>`) and keeps a lease on it alive (`register_node`,
`refresh_node`). When a lease expires, the node is taken for dead: `reap`
(run periodically by every node) removes each member of expired nodes with
one `leave` event per member, atomically per channel, so two nodes reaping
at once write every leave exactly once. A node that finds its own lease
gone (`refresh_node` returns False: it was too slow, and may have been
reaped) takes a new incarnation and joins its members again; joins of
members still present only re-tag them, so nobody sees a leave and a join
for a member that never left.

Error handling: every method raises `BrokerUnavailable` for backend trouble.
"""

from __future__ import annotations

import abc
import enum

import attrs
import orjson

PRESENCE_PREFIX = "$presence."
"""Internal pseudo-channels of presence changes start with this."""


def presence_channel(channel: str) -> str:
    """The internal pseudo-channel carrying `channel`'s presence changes."""
    return PRESENCE_PREFIX + channel


class JoinStatus(enum.Enum):
    JOINED = "joined"
    """A new member; its `join` event is on its way."""
    ALREADY = "already"
    """The connection was a member already: nothing changed, nothing sent."""
    FULL = "full"
    """The channel has `max_members` members: nothing changed."""


@attrs.frozen
class JoinOutcome:
    status: JoinStatus
    position: str
    """The channel's presence position after the call."""


@attrs.frozen
class Snapshot:
    """Members (one JSON array text, in join order, at most the `limit` asked
    for: embedded in replies as is, never parsed on the way), how many there
    are in all, how many distinct subs, and the presence position they
    reflect ("0-0" for a channel never joined)."""

    members_json: str
    total: int
    users: int
    position: str

    @property
    def members(self) -> tuple[str, ...]:
        """Each member as compact JSON (parses `members_json`: for tests and
        tools, not for hot paths)."""
        return tuple(orjson.dumps(member).decode() for member in orjson.loads(self.members_json))


@attrs.frozen
class Leaver:
    """A member that left (its JSON text) and the node that held it."""

    member: str
    node: str


class PresenceStore(abc.ABC):
    """See the module docstring."""

    @abc.abstractmethod
    async def join(
        self,
        org: str,
        channel: str,
        *,
        node: str,
        conn: str,
        sub: str,
        info: str | None,
        max_members: int,
    ) -> JoinOutcome:
        """Make `conn` a member held by `node` (see `JoinStatus`).

        `info` is compact JSON text of an object, or None (left out of the
        member). The member's `since` is the backend's clock at the join.
        """

    @abc.abstractmethod
    async def leave(self, org: str, channel: str, conn: str) -> Leaver | None:
        """Remove `conn`, whichever node holds it, sending its `leave`; None
        (and nothing sent) when it is not a member."""

    @abc.abstractmethod
    async def members(self, org: str, channel: str, limit: int) -> Snapshot:
        """The first `limit` members in join order, with the totals."""

    @abc.abstractmethod
    async def register_node(self, node: str, ttl: float) -> None:
        """Take (or extend) the lease of incarnation `node` until now + ttl."""

    @abc.abstractmethod
    async def refresh_node(self, node: str, ttl: float) -> bool:
        """Extend `node`'s lease to now + ttl if it is still live; False (and
        no lease) when it had expired or is unknown."""

    @abc.abstractmethod
    async def forget_node(self, node: str) -> None:
        """Drop `node`'s lease at once (graceful shutdown, after its members
        left): nothing is left for reapers to do about it."""

    @abc.abstractmethod
    async def reap(self) -> list[Leaver]:
        """Remove every member of every node whose lease expired, sending one
        `leave` per member; returns what this call removed (a member removed
        by a concurrent reaper is not in it)."""
