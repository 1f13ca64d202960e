"""One consumer group on this node: the reader task of (org, channel, group).

Theory of operation
-------------------
`GroupManager` (groups.py) starts one `GroupReader.run` per (org, channel,
group) with local members, when the first joins; the task ends once the last
has left and its events were released. A member is a connection plus its
consumer name `<node_id>:<conn id>`. The reader is the only task that changes
who holds what (read, claim, release, dead-letter); acks come from the
members' op workers and only drop local state after Redis acked.

Wake-ups. The reader is a router subscriber of its channel: every stored
event of the channel reaches every node through the broker's fan-out, and
`offer` marks "new events may be waiting". Reads never block. Besides, the
reader wakes for: a member joining or leaving, an ack (credit came back), the
earliest retry timer, and a poll every `POLL_INTERVAL` seconds (which also
reads, in case a wake-up was lost with a bus gap).

Credit. A member can take `delivery.group_prefetch` unacked events, and no
more than its outbox has room for (`OUTBOX_RESERVE` slots stay free for
replies); a closing connection takes nothing. The reader asks the broker for
exactly the credit of its members in one `read_new`, handed out round-robin,
starting one member further each time, so members share the work evenly and
Redis never hands this node more than it can deliver at once. A busy member
is refilled only once a quarter of its prefetch is free (an idle one at
once): under load that makes a few big reads instead of one per ack, which
is what the throughput depends on (each round trip costs far more than an
event).

Retries. Each delivered event is a `Flight` with a retry timer: if it is not
acked within `retry_delay(attempt)` (full jitter: uniform in [0, min(cap,
base * factor^(attempt-1))) ), it is claimed again for the same member
(attempt + 1) and pushed again; after the push of attempt
`delivery.max_attempts` has gone unacked for its delay, it is dead-lettered
(`<channel>.dlq`, a structured `dead_letter` log line, a metric). Timers are
one heap per reader, entries dropped lazily when their flight is gone.

Leaving. A member that leaves (unsubscribe, disconnect) has its flights
dropped at once and its consumer queued for `release`, which parks its
pending events for anybody; the reader then claims them at once for its
other members with credit (`claim_idle`, attempt + 1), and readers on other
nodes pick up the rest within one poll.

Dead nodes. Every poll also claims events idle for
`delivery.visibility_timeout` (those of consumers on nodes that died);
live readers `touch` their flights every third of it, so they are never
taken, and a flight that somebody else took after all is forgotten. Every
visibility timeout, consumers with nothing pending that were idle that long
are removed.

Errors: a step that meets `BrokerUnavailable` is retried after a capped
backoff; timers that were due stay due. Nothing is lost meanwhile: whatever
Redis holds for a consumer is claimed again by somebody within the
visibility timeout.
"""

from __future__ import annotations

import heapq
import itertools
import math

import attrs
import trio

from apix_trio.broker.groups import Delivery, dead_letter_channel
from apix_trio.broker.model import BrokerUnavailable
from apix_trio.delivery.backoff import retry_delay
from apix_trio.delivery.ports import MemberConnection, NodeServices
from apix_trio.observability.audit import AuditType
from apix_trio.observability.logs import get_logger
from apix_trio.protocol.codec import encode_event_push
from apix_trio.protocol.event import Event
from apix_trio.protocol.ids import StreamId
from apix_trio.protocol.wire import text_frame_str

POLL_INTERVAL = 0.5
"""Seconds between claims of released and abandoned events (and reads)."""

OUTBOX_RESERVE = 8
"""Outbox slots group events never take (room for replies and other pushes)."""

REFILL_DIVISOR = 4
"""A busy member is refilled once a quarter of its prefetch is free (fewer,
bigger reads); an idle member (nothing in flight) at once; everybody at
each poll."""

BACKOFF_BASE = 0.05
BACKOFF_CAP = 2.0
"""Retry of a step that met BrokerUnavailable: base * 2^(n-1), capped."""

log = get_logger("apix.groups")

GroupKey = tuple[str, str, str]


@attrs.define(eq=False)
class Member:
    """One connection in the group, as consumer `consumer`."""

    conn: MemberConnection
    consumer: str
    flights: dict[str, Flight] = attrs.Factory(dict)

    def credit(self, prefetch: int) -> int:
        conn = self.conn
        if conn.closing or not conn.outbox.has_room():
            return 0
        room = conn.outbox.max_items - len(conn.outbox) - OUTBOX_RESERVE
        return max(0, min(prefetch - len(self.flights), room))


@attrs.define(eq=False)
class Flight:
    """An event delivered to `member` and not acked yet."""

    member: Member
    event: Event
    attempt: int
    due: float = math.inf
    live: bool = True


class GroupReader:
    """The reader of one (org, channel, group) on this node. See the module docstring."""

    def __init__(self, hub: NodeServices, key: GroupKey) -> None:
        self.hub = hub
        self.key = key
        self.org, self.channel, self.group = key
        delivery = hub.settings.delivery
        self._prefetch = delivery.group_prefetch
        self._refill = max(1, self._prefetch // REFILL_DIVISOR)
        self._max_attempts = delivery.max_attempts
        self._visibility = delivery.visibility_timeout
        self._dlq_retention = hub.namespaces.retention(dead_letter_channel(self.channel))
        self.members: dict[str, Member] = {}
        self._departed: list[str] = []
        self._doomed: list[Delivery] = []
        self._flights: dict[str, Flight] = {}
        self._timers: list[tuple[float, int, Flight]] = []
        self._order = itertools.count()
        self._wake = trio.Event()
        self._new = True
        self._claim_now = True
        self._turn = 0
        # metric deltas, applied once per step (prometheus calls take a lock)
        self._pending_delta = 0
        self._deliveries = 0
        self._redeliveries = 0
        now = trio.current_time()
        self._next_poll = now
        self._next_touch = now + self._visibility / 3
        self._next_sweep = now + self._visibility
        self._log = log.bind(org=self.org, channel=self.channel, group=self.group)

    # -- called by other tasks (synchronous) -------------------------------------

    def offer(self, event_id: StreamId, event: Event, frame: bytes) -> None:
        """Router subscriber: a new event of the channel was stored."""
        self._new = True
        self._wake.set()

    def add(self, member: Member) -> None:
        self.members[member.conn.id] = member
        self.hub.metrics.group_members.inc()
        self._claim_now = True
        self._wake.set()

    def remove(self, conn_id: str) -> bool:
        """The member leaves: forget its flights, release its consumer soon."""
        member = self.members.pop(conn_id, None)
        if member is None:
            return False
        for flight in list(member.flights.values()):
            self._drop(flight)
        self._departed.append(member.consumer)
        self.hub.metrics.group_members.dec()
        self._wake.set()
        return True

    def acked(self, ids: list[str] | tuple[str, ...]) -> None:
        """Redis acked `ids`: forget their flights, whoever holds them here."""
        dropped = False
        for event_id in ids:
            flight = self._flights.get(event_id)
            if flight is not None:
                self._drop(flight)
                dropped = True
        if dropped:
            self._wake.set()

    def consumers(self) -> list[str]:
        """Every consumer of this node in the group (members and departed)."""
        return [member.consumer for member in self.members.values()] + self._departed

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    # -- the task ----------------------------------------------------------------

    async def run(self) -> None:
        """Serve the group until no member is left and everything was released.

        Resource handling: registers with the router for its channel and
        unregisters, drops its flights, in `finally` (synchronously).
        """
        router = self.hub.router
        router.add(self.org, self.channel, self)
        self.hub.metrics.group_readers.inc()
        failures = 0
        try:
            while self.members or self._departed or self._doomed:
                await self._wait()
                try:
                    await self._step()
                    self._flush_metrics()
                except Exception as exc:
                    failures += 1
                    if not isinstance(exc, BrokerUnavailable):
                        self._log.exception("group_reader_failed")  # a bug: keep serving
                    elif failures == 1:
                        self._log.warning("group_reader_unavailable", error=str(exc))
                    await trio.sleep(min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(failures - 1, 20)))
                else:
                    failures = 0
        finally:
            router.remove(self.org, self.channel, self)
            self.hub.metrics.group_readers.dec()
            for flight in list(self._flights.values()):
                self._drop(flight)
            self._flush_metrics()

    async def _wait(self) -> None:
        if not self._wake.is_set():
            deadline = min(self._next_poll, self._next_touch, self._next_sweep)
            if self._timers:
                deadline = min(deadline, self._timers[0][0])
            with trio.move_on_at(deadline):
                await self._wake.wait()
        self._wake = trio.Event()

    async def _step(self) -> None:
        groups = self.hub.broker.groups
        while self._departed:
            released = await groups.release(self.org, self.channel, self.group, self._departed[0])
            self._departed.pop(0)
            self._claim_now = self._claim_now or released > 0
        while self._doomed:
            await self._dead_letter(self._doomed[0])
            self._doomed.pop(0)
        await self._fire_due()
        now = trio.current_time()
        polled = now >= self._next_poll
        if self._claim_now or polled:
            self._claim_now = False
            self._new = True
            self._next_poll = now + POLL_INTERVAL
            await self._claim_idle()
        if self._new:
            await self._read_new(force=polled)
        if now >= self._next_touch:
            self._next_touch = now + self._visibility / 3
            await self._touch()
        if now >= self._next_sweep:
            self._next_sweep = now + self._visibility
            await groups.remove_idle_consumers(self.org, self.channel, self.group, self._visibility)

    # -- steps -------------------------------------------------------------------

    def _current(self, member: Member) -> bool:
        return self.members.get(member.conn.id) is member

    async def _read_new(self, *, force: bool) -> None:
        members = list(self.members.values())
        if not members:
            self._new = False
            return
        start = self._turn % len(members)
        wants = [
            (member, credit)
            for member in members[start:] + members[:start]
            if (credit := member.credit(self._prefetch)) > 0
        ]
        if not wants or not (
            force or any(credit >= self._refill or not m.flights for m, credit in wants)
        ):
            return  # `_new` stays set: read once enough credit came back
        self._new = False
        by_consumer = {member.consumer: member for member, _ in wants}
        got = await self.hub.broker.groups.read_new(
            self.org,
            self.channel,
            self.group,
            [(member.consumer, credit) for member, credit in wants],
        )
        for consumer, delivery in got:
            self._deliver(by_consumer[consumer], delivery)
        self._turn = start + max(1, len(got))
        if len(got) == sum(credit for _, credit in wants):
            self._new = True  # there may be more
            self._wake.set()

    async def _claim_idle(self) -> None:
        """Released events and those of dead nodes, for the member with most room."""
        best: Member | None = None
        room = 0
        for member in self.members.values():
            credit = member.credit(self._prefetch)
            if credit > room:
                best, room = member, credit
        if best is None:
            return
        got = await self.hub.broker.groups.claim_idle(
            self.org, self.channel, self.group, best.consumer, self._visibility, room
        )
        for delivery in got:
            self._deliver(best, delivery)
        if len(got) == room:
            self._claim_now = True
            self._wake.set()

    async def _fire_due(self) -> None:
        """Retry (same member) or dead-letter every flight whose timer is due."""
        now = trio.current_time()
        due: dict[Member, list[Flight]] = {}
        while self._timers and self._timers[0][0] <= now:
            at, _, flight = heapq.heappop(self._timers)
            if not flight.live or flight.due != at:
                continue
            flight.due = math.inf
            if flight.attempt >= self._max_attempts:
                self._drop(flight)
                self._doomed.append(Delivery(flight.event, flight.attempt))
                self._wake.set()  # dead-lettered at the start of the next step
            elif not flight.member.conn.closing:  # else it is about to leave
                due.setdefault(flight.member, []).append(flight)
        try:
            for member, flights in due.items():
                await self._retry(member, flights)
        except BaseException:
            for flights in due.values():  # not retried yet: still due
                for flight in flights:
                    if flight.live and flight.due == math.inf:
                        self._arm(flight, now)
            raise

    async def _retry(self, member: Member, flights: list[Flight]) -> None:
        got = await self.hub.broker.groups.claim(
            self.org, self.channel, self.group, member.consumer, [f.event.id for f in flights]
        )
        claimed = {delivery.event.id: delivery for delivery in got}
        for flight in flights:
            delivery = claimed.get(flight.event.id)
            if delivery is None:
                self._drop(flight)  # acked meanwhile, or trimmed
            elif flight.live:  # else acked here, or the member left
                self._deliver(member, delivery)

    async def _touch(self) -> None:
        groups = self.hub.broker.groups
        for member in list(self.members.values()):
            ids = list(member.flights)
            if not ids:
                continue
            held = set(await groups.touch(self.org, self.channel, self.group, member.consumer, ids))
            for event_id in ids:
                flight = member.flights.get(event_id)
                if flight is not None and event_id not in held:
                    self._log.info("group_event_taken", id=event_id, consumer=member.consumer)
                    self._drop(flight)

    async def _dead_letter(self, delivery: Delivery) -> None:
        event = delivery.event
        letter = await self.hub.broker.groups.dead_letter(
            self.org, self.channel, self.group, delivery, self._dlq_retention
        )
        self.hub.metrics.group_dead_letters.inc()
        self.hub.audit.record(
            self.org,
            AuditType.GROUP_DEAD_LETTER,
            detail={
                "channel": self.channel,
                "group": self.group,
                "id": event.id,
                "attempts": delivery.attempt,
            },
        )
        self._log.warning(
            "dead_letter",
            id=event.id,
            attempts=delivery.attempt,
            dlq=dead_letter_channel(self.channel),
            dlq_id=letter.id,
        )

    # -- local state ---------------------------------------------------------------

    def _deliver(self, member: Member, delivery: Delivery) -> None:
        """Push one delivery to `member` and arm its retry timer.

        A member that left meanwhile gets nothing: the event is pending for
        its consumer, which is released next. An event claimed past
        `max_attempts` (a race between nodes) is dead-lettered instead.
        """
        if not self._current(member):
            return
        event, attempt = delivery.event, delivery.attempt
        old = self._flights.get(event.id)
        if old is not None:
            self._drop(old)
        if attempt > self._max_attempts:
            self._doomed.append(Delivery(event, attempt - 1))
            self._wake.set()
            return
        flight = Flight(member, event, attempt)
        self._flights[event.id] = flight
        member.flights[event.id] = flight
        self._pending_delta += 1
        self._deliveries += 1
        d = self.hub.settings.delivery
        delay = retry_delay(
            attempt, base=d.retry_base, factor=d.retry_factor, cap=d.retry_max, rng=self.hub.rng
        )
        now = trio.current_time()
        self._arm(flight, now + delay)
        text = encode_event_push(self.channel, event, {"group": self.group, "attempt": attempt})
        if attempt == 1:
            member.conn.enqueue_event(text_frame_str(text), event.ts)
        else:
            self._redeliveries += 1
            member.conn.send_text(text)

    def _arm(self, flight: Flight, due: float) -> None:
        flight.due = due
        heapq.heappush(self._timers, (due, next(self._order), flight))

    def _drop(self, flight: Flight) -> None:
        if not flight.live:
            return
        flight.live = False
        event_id = flight.event.id
        if self._flights.get(event_id) is flight:
            del self._flights[event_id]
        if flight.member.flights.get(event_id) is flight:
            del flight.member.flights[event_id]
        self._pending_delta -= 1

    def _flush_metrics(self) -> None:
        metrics = self.hub.metrics
        if self._pending_delta:
            metrics.group_pending.inc(self._pending_delta)
            self._pending_delta = 0
        if self._deliveries:
            metrics.group_deliveries.inc(self._deliveries)
            self._deliveries = 0
        if self._redeliveries:
            metrics.group_redeliveries.inc(self._redeliveries)
            self._redeliveries = 0
