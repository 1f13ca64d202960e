"""What the delivery layer needs of the layers above it, as interfaces.

Consumer groups, group readers and the session keeper push to connections and
read the node's shared services, but they sit *below* the gateway that owns
connections: they hold these `typing.Protocol`s, which
`apix_trio.gateway.connection.Connection` and `apix_trio.gateway.hub.Hub`
satisfy structurally. Nothing here imports upward.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Protocol

from structlog.typing import FilteringBoundLogger

from apix_trio.broker.events import Broker
from apix_trio.observability.audit import AuditTrail
from apix_trio.observability.metrics import Metrics
from apix_trio.protocol.ids import StreamId
from apix_trio.routing.namespaces import Namespaces
from apix_trio.routing.router import Router
from apix_trio.routing.subscriptions import EventSink
from apix_trio.settings import Settings


class OutboxRoom(Protocol):
    """How full a connection's outbox is (group credit follows it)."""

    @property
    def max_items(self) -> int: ...

    def __len__(self) -> int: ...

    def has_room(self, size: int = 0, *, share: float = 1.0) -> bool: ...


class MemberConnection(EventSink, Protocol):
    """A connection as a consumer-group member: an id, room, and two ways to push.

    `enqueue_event` and `send_text` never block; a full outbox closes the
    connection (4009) instead.
    """

    @property
    def id(self) -> str: ...

    @property
    def org(self) -> str: ...

    @property
    def closing(self) -> bool: ...

    @property
    def outbox(self) -> OutboxRoom: ...

    @property
    def log(self) -> FilteringBoundLogger: ...

    def send_text(self, text: str) -> None: ...


class PositionedSubscription(Protocol):
    """A channel subscription as a session record sees it."""

    @property
    def channel(self) -> str: ...

    @property
    def positioned(self) -> bool: ...

    @property
    def sent_id(self) -> StreamId: ...


class SessionConnection(Protocol):
    """A connection as the session keeper sees it. `session` is reassigned on
    resume (the connection takes the old session id over)."""

    session: str

    @property
    def id(self) -> str: ...

    @property
    def org(self) -> str: ...

    @property
    def sub(self) -> str: ...

    @property
    def log(self) -> FilteringBoundLogger: ...

    @property
    def subscriptions(self) -> Mapping[str, PositionedSubscription]: ...

    def group_memberships(self) -> list[tuple[str, str]]:
        """(channel, group) of every group this connection is a member of."""
        ...

    @property
    def state_watches(self) -> Mapping[str, object]:
        """The connection's state subscriptions, by key."""
        ...


class NodeServices(Protocol):
    """The node's shared services that group readers use."""

    @property
    def settings(self) -> Settings: ...

    @property
    def broker(self) -> Broker: ...

    @property
    def namespaces(self) -> Namespaces: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def router(self) -> Router: ...

    @property
    def rng(self) -> random.Random: ...

    @property
    def audit(self) -> AuditTrail: ...
