"""The delivery canary: readiness means events actually come back.

Theory of operation
-------------------
HTTP_API.md ("Delivery canary"): `ready` is true only when, within the last
`heartbeat.interval`, an event this node published to an internal channel
came back to this node through the path client events take. The canary
publishes to org `$apix`, channel `$canary.<node id>` with the ordinary
`Broker.publish` (Redis: the publish script, the bus shard, the node's bus
reader, the listener), and listens as an ordinary router subscriber. No
client can reach it: a token's `org` must match `[a-z0-9][a-z0-9_-]*`, so
`$apix` is outside every org's name space, and in Redis the org is escaped
to `%24apix`, a key part no real org produces.

`serve` publishes one canary every `interval / 3` (every `RECOVER_PERIOD`
seconds, at most, while the canary is failing, so readiness comes back
soon after the backend does), each publish bounded by the period; `offer`
(called by the router) stamps the arrival time. `readiness()` is pure
arithmetic on that stamp, so a stuck bus reader or a Redis that lost the bus
turns the node unready within `interval` even while publishes succeed.

Until the first canary comes back (a few milliseconds after start with a
healthy backend), the node is not ready.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import trio

from apix_trio.broker.events import Broker
from apix_trio.broker.model import BrokerUnavailable, Retention
from apix_trio.observability.logs import get_logger
from apix_trio.protocol.event import Event
from apix_trio.protocol.ids import StreamId
from apix_trio.routing.router import Router

CANARY_ORG = "$apix"
"""The internal org: outside every org's name space (orgs are [a-z0-9][a-z0-9_-]*)."""
CANARY_RETENTION = Retention(history_size=1, history_ttl=300.0, dedupe_window=0.0)
RECOVER_PERIOD = 1.0
"""Seconds between canaries, at most, while they do not come back."""

log = get_logger("apix.canary")


def canary_channel(node: str) -> str:
    return f"$canary.{node}"


class DeliveryCanary:
    """See the module docstring."""

    def __init__(
        self,
        broker: Broker,
        router: Router,
        node: str,
        interval: float,
        *,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._broker = broker
        self._router = router
        self.node = node
        self.channel = canary_channel(node)
        self.interval = interval
        self._clock = clock
        self._sent = itertools.count(1)
        self.last_seen: float | None = None
        self.seen = 0
        self.failures = 0

    # -- router subscriber ---------------------------------------------------------

    def offer(self, event_id: StreamId, event: Event, frame: bytes) -> None:
        """An event of our canary channel came back through the router."""
        if event.sender == self.node:
            self.last_seen = self._clock()
            self.seen += 1

    # -- readiness -----------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason): the broker answers and a canary came back within
        `interval`. The reason is "" when ready."""
        if not self._broker.ready:
            return False, "broker unavailable"
        if self.last_seen is None:
            return False, "delivery canary has not come back yet"
        age = self._clock() - self.last_seen
        if age > self.interval:
            return False, f"delivery canary not seen for {age:.1f} s (bus stalled?)"
        return True, ""

    def _healthy(self) -> bool:
        return self.last_seen is not None and self._clock() - self.last_seen <= self.interval

    # -- the task ------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish canaries until cancelled (see the module docstring).

        Resource handling: the router entry is removed on exit. Error
        handling: a failed publish is counted and logged once per outage;
        nothing escapes.
        """
        self._router.add(CANARY_ORG, self.channel, self)
        task_status.started()
        failing = False
        try:
            while True:
                period = self.interval / 3
                if not self._healthy():
                    period = min(period, RECOVER_PERIOD)
                started = trio.current_time()
                with trio.move_on_after(period):
                    try:
                        await self._broker.publish(
                            CANARY_ORG,
                            self.channel,
                            str(next(self._sent)),
                            sender=self.node,
                            key=None,
                            retention=CANARY_RETENTION,
                        )
                    except BrokerUnavailable as exc:
                        self.failures += 1
                        if not failing:
                            log.warning("canary_publish_failed", error=str(exc))
                        failing = True
                    else:
                        failing = False
                await trio.sleep_until(started + period)
        finally:
            self._router.remove(CANARY_ORG, self.channel, self)
