"""What every connection of one server shares: settings, broker, router, keys, metrics.

The hub owns no tasks; `apix_trio.server` builds it and runs the services
(among them `timers.serve` and `coalescer.serve`, which every connection needs).
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import attrs

from apix_trio.auth.keys import Verifier
from apix_trio.broker.audit import AuditRetention
from apix_trio.broker.events import Broker
from apix_trio.delivery.canary import DeliveryCanary
from apix_trio.delivery.groups import GroupManager
from apix_trio.delivery.presence import PresenceService
from apix_trio.delivery.sessions import SessionKeeper
from apix_trio.gateway.coalesce import WriteCoalescer
from apix_trio.gateway.control import CONTROL_CHANNEL, ControlChannel
from apix_trio.gateway.directory import DirectoryKeeper
from apix_trio.gateway.registry import ConnectionRegistry
from apix_trio.gateway.slots import ConnectionSlots
from apix_trio.gateway.tally import DeliveryTally
from apix_trio.gateway.timers import TimerService
from apix_trio.observability.audit import AuditRecord, AuditTrail, AuditWriter
from apix_trio.observability.latency import LatencyStore, LatencyTracker
from apix_trio.observability.logs import get_logger
from apix_trio.observability.metrics import Metrics
from apix_trio.protocol.frames import Command
from apix_trio.routing.namespaces import Namespaces
from apix_trio.routing.router import Router
from apix_trio.routing.state import STATE_KIND, encode_state_push
from apix_trio.settings import Settings


class CommandRunner(Protocol):
    """Runs one command of a connection and queues exactly one reply
    (`apix_trio.commands.dispatch.run_command`, wired in by `server.serve`:
    the gateway sits below the op handlers and holds only this callable)."""

    def __call__(self, conn: Any, command: Command, received_at: float) -> Awaitable[None]: ...


@attrs.define
class Hub:
    """See the module docstring."""

    settings: Settings
    broker: Broker
    verifier: Verifier
    router: Router = attrs.field(factory=Router)
    metrics: Metrics = attrs.field(factory=Metrics)
    registry: ConnectionRegistry = attrs.field(factory=ConnectionRegistry)
    namespaces: Namespaces = attrs.field(default=None)
    wall_clock: Callable[[], float] = time.time
    rng: random.Random = attrs.field(factory=random.Random)
    accepting: bool = True
    sessions: SessionKeeper = attrs.field(default=None)
    groups: GroupManager = attrs.field(default=None)
    slots: ConnectionSlots = attrs.field(default=None)
    presence: PresenceService = attrs.field(default=None)
    commands: CommandRunner = attrs.field(kw_only=True)
    directory: DirectoryKeeper = attrs.field(default=None, kw_only=True)
    control: ControlChannel = attrs.field(default=None, kw_only=True)
    audit: AuditTrail = attrs.field(default=None, kw_only=True)
    latency: LatencyTracker = attrs.field(default=None, kw_only=True)
    canary: DeliveryCanary = attrs.field(default=None, kw_only=True)
    tally: DeliveryTally = attrs.field(default=None, kw_only=True)
    # Node-level services every connection uses; `serve` runs their tasks.
    timers: TimerService = attrs.field(factory=TimerService, kw_only=True)
    coalescer: WriteCoalescer = attrs.field(factory=WriteCoalescer, kw_only=True)
    log = get_logger("apix.server")

    def __attrs_post_init__(self) -> None:
        if self.namespaces is None:
            self.namespaces = Namespaces(self.settings)
        if self.sessions is None:
            self.sessions = SessionKeeper.for_broker(self.broker, self.settings.sessions.ttl)
        if self.groups is None:
            self.groups = GroupManager(self)
        if self.slots is None:
            self.slots = ConnectionSlots(
                self.broker.leases,
                self.settings.server.node_id,
                self.settings.limits.max_connections_per_org,
            )
        if self.directory is None:
            self.directory = DirectoryKeeper(
                self.broker.directory,
                self.settings.server.node_id,
                self.settings.presence.ttl,
                self.wall,
            )
        if self.control is None:
            self.control = ControlChannel(
                self.broker, self.registry, self.settings.server.node_id
            )
        self.router.handle_internal(CONTROL_CHANNEL, self.control.handle)
        if self.presence is None:
            self.presence = PresenceService(self)
        self.router.set_internal_encoder(STATE_KIND, encode_state_push)
        self.broker.set_listener(self.router.dispatch)
        self._add_observers()

    def _add_observers(self) -> None:
        """The audit writer, the latency tracker, the delivery tally and the canary."""
        node = self.settings.server.node_id
        if self.audit is None:
            self.audit = AuditTrail(
                _audit_writer(self.broker, self.settings),
                node=node,
                wall_clock=self.wall_clock,
                registry=self.metrics.registry,
            )
        if self.latency is None:
            self.latency = LatencyTracker(
                node,
                wall_clock=self.wall_clock,
                store=_latency_store(self.broker),
                registry=self.metrics.registry,
            )
        if self.tally is None:
            self.tally = DeliveryTally(self.metrics, self.latency, self.wall_clock)
        self.coalescer.after_flush = self.tally.commit
        if self.canary is None:
            self.canary = DeliveryCanary(
                self.broker, self.router, node, self.settings.heartbeat.interval
            )

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason) for `GET /api/v1/ready`: accepting connections, the
        broker answers, and the delivery canary came back within
        `heartbeat.interval` (`delivery/canary.py`). The reason is "" when ready."""
        if not self.accepting:
            return False, "shutting down"
        return self.canary.readiness()

    def wall(self) -> float:
        """Wall-clock seconds (injectable so timer tests run on a MockClock)."""
        return self.wall_clock()


def audit_retention(settings: Settings) -> AuditRetention:
    return AuditRetention(max_entries=settings.audit.max_entries, ttl=settings.audit.ttl)


def _audit_writer(broker: Broker, settings: Settings) -> AuditWriter | None:
    try:
        store = broker.audit
    except NotImplementedError:
        return None
    retention = audit_retention(settings)

    async def write(records: Sequence[AuditRecord]) -> object:
        return await store.append_many(records, retention)

    return write


def _latency_store(broker: Broker) -> LatencyStore | None:
    try:
        return broker.latency
    except NotImplementedError:
        return None
