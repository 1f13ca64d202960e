"""Consumer groups on a channel stream: competing consumers, at-least-once.

The interface; the embedded implementation lives in `memory_groups.py`, the
Redis Streams one (XGROUP/XREADGROUP/XCLAIM/XAUTOCLAIM/XACK) in
`redis_groups.py`. One contract suite runs against both.

Theory of operation
-------------------
A group is created on a channel at its current end ("$"): it sees only events
published after it exists. Each event is handed to exactly one consumer by
`read_new` and stays *pending* for that consumer until acked. A pending event
carries a delivery count (`attempt`, 1 for the first delivery); `claim` moves
pending events to a consumer and increments it. `release` makes a departing
consumer's pending events claimable at once by anybody (`claim_idle` with any
`min_idle`), which is how a member that disconnects hands its work to members
on other nodes. `claim_idle` is also how a node reclaims the work of a
consumer on a node that died: events idle for `min_idle` seconds; `touch`
resets the idle time of events a live node still holds.

Consumer names are `<node_id>:<conn id>`; group names are validated by the
protocol layer (`[A-Za-z0-9_\\-:@]{1,64}`) and scoped to (org, channel).

Error handling: every method raises `BrokerUnavailable` for backend trouble.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import attrs

from apix_trio.broker.base import Event, Retention


@attrs.frozen
class Delivery:
    """One pending event handed to a consumer; `attempt` counts deliveries."""

    event: Event
    attempt: int


@attrs.frozen
class PendingEntry:
    id: str
    consumer: str
    attempt: int
    idle: float


class ConsumerGroups(abc.ABC):
    """See the module docstring."""

    @abc.abstractmethod
    async def join(self, org: str, channel: str, group: str) -> None:
        """Create the group at the channel's current end if it does not exist."""

    @abc.abstractmethod
    async def read_new(
        self, org: str, channel: str, group: str, consumer: str, count: int, *, wait: float
    ) -> list[Delivery]:
        """Up to `count` events never delivered to the group, now pending for
        `consumer` with attempt 1. Waits up to `wait` seconds when there are none."""

    @abc.abstractmethod
    async def claim(
        self, org: str, channel: str, group: str, consumer: str, ids: Sequence[str]
    ) -> list[Delivery]:
        """Move still-pending `ids` to `consumer`, incrementing their attempt.

        Ids no longer pending (acked) or no longer stored (trimmed) are left
        out of the result; trimmed ones are also acked.
        """

    @abc.abstractmethod
    async def claim_idle(
        self, org: str, channel: str, group: str, consumer: str, min_idle: float, count: int
    ) -> list[Delivery]:
        """Claim up to `count` pending events idle for `min_idle` seconds or
        longer (whoever holds them), incrementing their attempt."""

    @abc.abstractmethod
    async def touch(
        self, org: str, channel: str, group: str, consumer: str, ids: Sequence[str]
    ) -> None:
        """Reset the idle time of `ids` held by `consumer` (no attempt change)."""

    @abc.abstractmethod
    async def release(self, org: str, channel: str, group: str, consumer: str) -> int:
        """Make every event pending for `consumer` claimable by `claim_idle`
        at once, remove the consumer; returns how many were released."""

    @abc.abstractmethod
    async def ack(self, org: str, channel: str, group: str, ids: Sequence[str]) -> int:
        """Acknowledge `ids`; returns how many were pending and are now acked."""

    @abc.abstractmethod
    async def pending(
        self, org: str, channel: str, group: str, consumer: str | None = None
    ) -> list[PendingEntry]:
        """Pending entries of the group (or of one consumer), oldest first."""

    @abc.abstractmethod
    async def dead_letter(
        self,
        org: str,
        channel: str,
        group: str,
        delivery: Delivery,
        retention: Retention,
    ) -> Event:
        """Atomically publish `{"event", "group", "attempts"}` to the channel
        `<channel>.dlq` of the same org and ack the event on the group."""

    @abc.abstractmethod
    async def remove_idle_consumers(
        self, org: str, channel: str, group: str, min_idle: float
    ) -> list[str]:
        """Delete consumers with no pending events, idle `min_idle` s or more."""
