"""Consumer groups on a channel stream: competing consumers, at-least-once.

The interface; the embedded implementation lives in `memory/groups.py`, the
Redis Streams one (XGROUP/XREADGROUP/XCLAIM/XAUTOCLAIM/XACK) in
`redis/groups.py`. One contract suite (`tests/test_groups_contract.py`) runs
against both.

Theory of operation
-------------------
A group is created on a channel at its current end ("$"): it sees only events
published after it exists. Each event is handed to exactly one consumer by
`read_new` and stays *pending* for that consumer until acked. A pending event
carries a delivery count (`attempt`, 1 for the first delivery); `claim` moves
pending events to a consumer and increments it. `release` makes a departing
consumer's pending events claimable at once by anybody (`claim_idle` with any
`min_idle`): they are parked under the consumer name `RELEASED` with an idle
time of `RELEASED_IDLE`, which is how a member that disconnects hands its work
to members on other nodes. `claim_idle` is also how a node reclaims the work
of a consumer on a node that died: events idle for `min_idle` seconds; `touch`
resets the idle time of events a live node still holds.

Reads do not block: every node already sees every event of the channel
through the broker's fan-out (the router), which is what wakes a group
reader; a blocking read would need a connection of its own per (group,
consumer) and could not share the broker's pipelined batches.

Retention applies: a group delivers the events its channel still retains.
An event trimmed (`history_size`) or expired (`history_ttl`) before it was
read is never delivered; one trimmed while pending is dropped (acked) by the
next `claim`/`claim_idle`/`touch` that meets it. (Redis also deletes the
group itself with an expired stream; `read_new` then recreates it at the
start of the new stream, which holds only events published after the old
one expired, so nothing retained is skipped.)

Consumer names are `<node_id>:<conn id>` (they always contain a colon, so
they never collide with `RELEASED`); group names are validated by the
protocol layer (`[A-Za-z0-9_\\-:@]{1,64}`) and scoped to (org, channel).

Error handling: every method raises `BrokerUnavailable` for backend trouble.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Protocol

import attrs
import orjson

from apix_trio.broker.model import Published, Retention
from apix_trio.protocol.codec import encode_event
from apix_trio.protocol.event import Event

RELEASED = "apix.released"
"""The consumer that holds released events until somebody claims them."""

RELEASED_IDLE = 10 * 365 * 86400.0
"""The idle time (seconds) a released event shows: older than any `min_idle`."""


def dead_letter_channel(channel: str) -> str:
    """The channel that receives `channel`'s dead letters (same org)."""
    return f"{channel}.dlq"


def dead_letter_key(group: str, event_id: str) -> str:
    """The idempotency key of a dead letter: a retried `dead_letter` of the
    same event for the same group stores nothing new."""
    return f"dlq:{group}:{event_id}"


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
    """Seconds since the event was last delivered, claimed or touched."""


@attrs.frozen
class ConsumerInfo:
    name: str
    pending: int
    idle: float
    """Seconds since the consumer last read, claimed or touched anything."""


@attrs.frozen
class GroupInfo:
    """What an operator sees of a group: its consumers (the holder of released
    events, `RELEASED`, among them while it holds any) and their pending counts."""

    consumers: tuple[ConsumerInfo, ...]

    @property
    def pending(self) -> int:
        return sum(consumer.pending for consumer in self.consumers)


class ConsumerGroups(abc.ABC):
    """See the module docstring."""

    @abc.abstractmethod
    async def join(self, org: str, channel: str, group: str) -> None:
        """Create the group at the channel's current end if it does not exist."""

    @abc.abstractmethod
    async def read_new(
        self, org: str, channel: str, group: str, wants: Sequence[tuple[str, int]]
    ) -> list[tuple[str, Delivery]]:
        """Events never delivered to the group, oldest first, handed out
        round-robin over `wants` (`(consumer, count)` pairs, in order, each
        consumer getting at most its count): the first event to the first
        consumer, the next to the next consumer with room, and so on.

        Each is now pending for its consumer with attempt 1. Returns
        `(consumer, delivery)` pairs in id order; empty when there is nothing
        new (it never waits).
        """

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
        """Claim up to `count` pending events for `consumer`, incrementing
        their attempt: those idle for `min_idle` seconds or longer, whoever
        holds them, and released ones (idle longer than any `min_idle`);
        oldest first. Trimmed ones are acked, not returned."""

    @abc.abstractmethod
    async def touch(
        self, org: str, channel: str, group: str, consumer: str, ids: Sequence[str]
    ) -> list[str]:
        """Reset the idle time of those `ids` still pending for `consumer`
        (no attempt change) and return them; the others (acked, claimed by
        somebody else, trimmed) are left alone, and the caller should forget
        them."""

    @abc.abstractmethod
    async def release(self, org: str, channel: str, group: str, consumer: str) -> int:
        """Make every event pending for `consumer` claimable by `claim_idle`
        at once (held by `RELEASED`, attempt unchanged), remove the consumer;
        returns how many were released."""

    @abc.abstractmethod
    async def ack(self, org: str, channel: str, group: str, ids: Sequence[str]) -> int:
        """Acknowledge `ids` for the whole group (whichever consumer holds
        them); returns how many were pending and are now acked."""

    @abc.abstractmethod
    async def ack_many(
        self, org: str, channel: str, group: str, batches: Sequence[Sequence[str]]
    ) -> list[int]:
        """`ack` of several id lists at once (one backend round trip): the
        lists are acked one after the other, and each count is what `ack`
        of that list alone would have returned at that point (an id in two
        lists counts for the first)."""

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
        """Publish `{"event", "group", "attempts"}` to the channel
        `dead_letter_channel(channel)` of the same org, then ack the event on
        the group; returns the dead letter.

        The dead letter is an ordinary event of that channel (stored with
        `retention`, fanned out to its subscribers), sent `from` the original
        event's sender, with the idempotency key `dead_letter_key(group, id)`.
        Publish-then-ack (the DLQ channel may live in another Redis Cluster
        slot) makes it at-least-once, and the key makes a retry after a
        failure between the two steps store nothing new within the DLQ
        channel's `dedupe_window`.
        """

    @abc.abstractmethod
    async def remove_idle_consumers(
        self, org: str, channel: str, group: str, min_idle: float
    ) -> list[str]:
        """Delete consumers with no pending events, idle `min_idle` s or more.

        Harmless for a live consumer: one is created again by the next read
        or claim that hands it something.
        """

    @abc.abstractmethod
    async def info(self, org: str, channel: str, group: str) -> GroupInfo | None:
        """The group's consumers, by name; None when the group does not exist
        (never joined, or its channel retains nothing: Redis deletes a group
        with its stream)."""

    @abc.abstractmethod
    async def redrive_cursor(self, org: str, channel: str, group: str) -> str:
        """The id of the last dead letter of `<channel>.dlq` redriven for
        `group` (`"0-0"` before the first redrive)."""

    @abc.abstractmethod
    async def advance_redrive_cursor(
        self, org: str, channel: str, group: str, event_id: str
    ) -> str:
        """Move the redrive cursor forward to `event_id` (never back: a
        smaller id leaves it where it is), atomically; returns the cursor."""


class EventPublisher(Protocol):
    """What a dead letter needs of the event broker: its `publish`."""

    async def publish(
        self,
        org: str,
        channel: str,
        data: str,
        *,
        sender: str,
        key: str | None,
        retention: Retention,
    ) -> Published: ...


def dead_letter_data(event: Event, group: str, attempts: int) -> str:
    """The JSON text of a dead letter's data:
    `{"event": <the original event as delivered>, "group", "attempts"}`."""
    return orjson.dumps(
        {"event": encode_event(event), "group": group, "attempts": attempts}
    ).decode()


async def publish_dead_letter(
    broker: EventPublisher,
    org: str,
    channel: str,
    group: str,
    delivery: Delivery,
    retention: Retention,
) -> Event:
    """Publish the dead letter of `delivery` to `<channel>.dlq` (idempotent by
    `dead_letter_key`, so a retry after a failed ack stores nothing twice).
    Both implementations ack the original after this."""
    event = delivery.event
    published = await broker.publish(
        org,
        dead_letter_channel(channel),
        dead_letter_data(event, group, delivery.attempt),
        sender=event.sender,
        key=dead_letter_key(group, event.id),
        retention=retention,
    )
    return published.event
