"""The broker interface: event storage, history and cross-node fan-out.

Two implementations stand beside this file: `memory.py` (embedded, one
process) and `redis.py` (Redis Streams, many nodes). One contract test suite
(`tests/test_broker_contract.py`) runs against both; anything it observes
must be identical.

Theory of operation
-------------------
Every channel is a stream identified by (org, channel). A publish appends one
event with a fresh id `<ms>-<seq>` strictly greater than every id the channel
ever had (also across retention expiry), stores it, and only then returns.
After storing, the broker hands the event to the fan-out listener of *every*
node (`set_listener`), per channel in id order, each event once per node.

Retention: a channel keeps at least its newest `history_size` events (more is
allowed: trimming may be approximate) until `history_ttl` seconds after its
last publish; then its history is gone, but the channel remembers its last id
(a tombstone) for at least `TOMBSTONE_GRACE` seconds longer, so that
`recovered` stays exact and new ids stay above old ones.

`recovered` for a read after `since` is true exactly when every event with an
id greater than `since` that the channel ever stored is still retained. It is
false when anything after `since` was trimmed or expired, and when `since` is
not an id of this incarnation of the channel (the stream was deleted and
recreated, e.g. FLUSHALL or failover to an empty replica): a real id the client
saw is either still stored, or not after the highest deleted id. Once even the
tombstone is gone nothing is known, and only `since == "0-0"` counts as
recovered.

Error handling: every method raises `BrokerUnavailable` when the backend cannot
answer within `broker.operation_timeout`; nothing else escapes for backend
trouble. A publish that raised may or may not have been stored (the caller
says `unavailable` and the client retries with the same idempotency key).
"""

from __future__ import annotations

import abc

from apix_trio.broker.audit import AuditLog
from apix_trio.broker.directory import ConnectionDirectory
from apix_trio.broker.groups import ConsumerGroups
from apix_trio.broker.latency import LatencySnapshots
from apix_trio.broker.leases import ConnectionLeases
from apix_trio.broker.model import ChannelInfo, Listener, Page, Published, Retention
from apix_trio.broker.presence import PresenceStore
from apix_trio.broker.sessions import SessionStore
from apix_trio.broker.state import StateStore


class Broker(abc.ABC):
    """Stores events and fans them out. See the module docstring."""

    @abc.abstractmethod
    def set_listener(self, listener: Listener) -> None:
        """Route every event (from any node) to `listener` from now on."""

    @property
    @abc.abstractmethod
    def ready(self) -> bool:
        """True while the backend answers (readiness probe)."""

    @abc.abstractmethod
    async def publish(
        self,
        org: str,
        channel: str,
        data: str,
        *,
        sender: str,
        key: str | None,
        retention: Retention,
    ) -> Published:
        """Store one event and return it once stored.

        With `key`, a second publish of the same key on the same channel
        within `retention.dedupe_window` stores nothing and returns the first
        event with `duplicate=True`.
        """

    @abc.abstractmethod
    async def read_after(
        self, org: str, channel: str, since: str, limit: int, retention: Retention
    ) -> Page:
        """Up to `limit` retained events with id > `since`, oldest first."""

    @abc.abstractmethod
    async def read_latest(
        self, org: str, channel: str, limit: int, retention: Retention
    ) -> Page:
        """The newest `limit` retained events, oldest first."""

    @abc.abstractmethod
    async def position(self, org: str, channel: str) -> str:
        """The channel's last id, `"0-0"` when it never had an event."""

    @abc.abstractmethod
    async def list_channels(self, org: str, prefix: str, limit: int) -> list[ChannelInfo]:
        """Channels of `org` that retain history, whose names start with
        `prefix`, sorted by name: at most `limit` of them.

        Only well-formed channel names are listed (internal pseudo-channels
        such as `$control` never are). The Redis implementation finds them
        with a bounded SCAN of the org's stream keys (`LIST_SCAN_BUDGET`
        keys examined at most, on the node `broker.redis_url` names), so on
        a very large keyspace it may return fewer than exist; the embedded
        one looks at every channel it holds.
        """

    @property
    def groups(self) -> ConsumerGroups:
        """Consumer groups on this broker's channel streams."""
        raise NotImplementedError(f"{type(self).__name__} has no consumer groups yet")

    @property
    def leases(self) -> ConnectionLeases:
        """Connection leases for the cluster-wide per-org connection cap."""
        raise NotImplementedError(f"{type(self).__name__} has no connection leases")

    @property
    def directory(self) -> ConnectionDirectory:
        """Every node's authenticated connections (`broker/directory.py`)."""
        raise NotImplementedError(f"{type(self).__name__} has no connection directory")

    @property
    def presence(self) -> PresenceStore:
        """Channel presence on this broker (changes fan out like events)."""
        raise NotImplementedError(f"{type(self).__name__} has no presence yet")

    @property
    def state(self) -> StateStore:
        """Versioned state values on this broker (changes fan out like events)."""
        raise NotImplementedError(f"{type(self).__name__} has no state yet")

    @property
    def sessions(self) -> SessionStore:
        """Session records on this broker's backend."""
        raise NotImplementedError(f"{type(self).__name__} has no session store yet")

    @property
    def audit(self) -> AuditLog:
        """The org audit trails on this broker's backend (`broker/audit.py`)."""
        raise NotImplementedError(f"{type(self).__name__} has no audit trail")

    @property
    def latency(self) -> LatencySnapshots:
        """Per-org latency snapshots shared by the nodes (`broker/latency.py`)."""
        raise NotImplementedError(f"{type(self).__name__} has no latency snapshots")
