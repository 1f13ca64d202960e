"""The node's presence service on a MockClock: lease refresh, reaping, leaves.

Two `PresenceService`s (nodes "a" and "b") share one embedded broker, as two
nodes share Redis; the router records every presence change with the
virtual time it arrived, so timing is asserted exactly. A node "dies" by
having its service cancelled while it still has members (its exit path
then leaves its lease alone, as a crash would).

With `presence.ttl` = 30: the lease is 20 s, refreshed every 10 s; reapers
look every 5 s.
"""

from __future__ import annotations

from typing import Any

import attrs
import orjson
import pytest
import trio
import trio.testing
from structlog.typing import FilteringBoundLogger

from apix_trio.broker.memory.events import MemoryBroker
from apix_trio.broker.presence import presence_channel
from apix_trio.delivery.presence import PresenceService
from apix_trio.observability.logs import get_logger
from apix_trio.observability.metrics import Metrics
from apix_trio.protocol.event import Event
from apix_trio.protocol.ids import StreamId
from apix_trio.routing.namespaces import Namespaces
from apix_trio.routing.router import Router
from apix_trio.settings import PresenceSettings, ServerSettings, Settings
from tests.brokers import FakeWallClock

pytestmark = pytest.mark.timeout(30)

ORG, CHANNEL = "acme", "chat.a"


@attrs.define(eq=False)
class FakeConn:
    id: str
    org: str = ORG
    frames: list[bytes] = attrs.Factory(list)

    @property
    def log(self) -> FilteringBoundLogger:
        return get_logger("test").bind(conn=self.id)

    def enqueue_event(self, frame: bytes, ts: int | None, /) -> None:
        self.frames.append(frame)


@attrs.define
class Node:
    settings: Settings
    broker: MemoryBroker
    router: Router
    namespaces: Namespaces
    metrics: Metrics = attrs.Factory(Metrics)
    rng: Any = None


class Recorder:
    """Every presence change of CHANNEL with the virtual time it arrived."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, str, str]] = []

    def offer(self, event_id: StreamId, event: Event, frame: bytes) -> None:
        ((kind, member),) = orjson.loads(event.data).items()
        self.seen.append((trio.current_time(), kind, member["conn"]))


def pushed(conn: FakeConn) -> list[dict[str, Any]]:
    """The JSON of the WebSocket text frames a fake connection was given
    (a write may hold several: pushes are coalesced per connection)."""
    out = []
    for chunk in conn.frames:
        at = 0
        while at < len(chunk):
            length = chunk[at + 1] & 0x7F
            start = at + (2 if length < 126 else 4 if length == 126 else 10)
            if length == 126:
                length = int.from_bytes(chunk[at + 2 : at + 4], "big")
            elif length == 127:
                length = int.from_bytes(chunk[at + 2 : at + 10], "big")
            out.append(orjson.loads(chunk[start : start + length]))
            at = start + length
    return out


def make_node(name: str, broker: MemoryBroker, router: Router) -> Node:
    settings = Settings(server=ServerSettings(node_id=name), presence=PresenceSettings(ttl=30))
    return Node(settings, broker, router, Namespaces(settings))


@attrs.define
class Cluster:
    broker: MemoryBroker
    router: Router
    recorder: Recorder
    nursery: trio.Nursery

    async def start(self, name: str) -> tuple[PresenceService, trio.CancelScope]:
        service = PresenceService(make_node(name, self.broker, self.router))
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                await service.run(task_status=task_status)

        await self.nursery.start(run)
        return service, scope


@pytest.fixture
async def cluster() -> Any:
    """Two nodes' shared broker and router (tests take `autojump_clock`)."""
    broker = MemoryBroker(wall_clock=FakeWallClock())
    router = Router()
    broker.set_listener(router.dispatch)
    recorder = Recorder()
    router.add(ORG, presence_channel(CHANNEL), recorder)
    async with trio.open_nursery() as nursery:
        yield Cluster(broker, router, recorder, nursery)
        nursery.cancel_scope.cancel()


async def join_all(service: PresenceService, conns: list[FakeConn]) -> None:
    for conn in conns:
        joined = await service.join(conn, CHANNEL, sub=f"user-{conn.id}", info=None)
        joined.go_live()


@pytest.mark.parametrize(
    ("death", "reaped_at"),
    [
        (25.0, 40.0),  # refreshed at 10 and 20: lease until 40, found by the reap at 40
        (20.5, 40.0),  # just after a refresh: the worst case, 19.5 s later
        (19.5, 30.0),  # just before the refresh at 20: lease until 30
    ],
)
async def test_members_of_a_dead_node_leave_once_within_the_ttl(
    autojump_clock, cluster, death, reaped_at
):
    a, a_scope = await cluster.start("a")
    b, _ = await cluster.start("b")
    conns = [FakeConn(f"a{i}") for i in range(3)]
    await join_all(a, conns)
    watcher = FakeConn("b0")
    await join_all(b, [watcher])
    await trio.sleep_until(death)
    a_scope.cancel()  # the node dies with its members
    await trio.sleep_until(reaped_at + 10)
    leaves = [(at, conn) for at, kind, conn in cluster.recorder.seen if kind == "leave"]
    assert sorted(leaves) == [(reaped_at, conn.id) for conn in conns]
    assert reaped_at - death <= 30
    # The surviving member's watch pushed exactly one leave per member.
    leaves_pushed = [p["leave"]["conn"] for p in pushed(watcher) if "leave" in p]
    assert leaves_pushed == [c.id for c in conns]
    snapshot = await cluster.broker.presence.members(ORG, CHANNEL, 10)
    assert snapshot.total == 1
    assert b.store is cluster.broker.presence
    assert b._node.metrics.presence_leaves._value.get() == 3  # the reaper's node counts them


async def test_the_lease_is_refreshed_every_third_of_the_ttl(autojump_clock, cluster):
    await cluster.start("a")
    refreshed: list[float] = []
    store = cluster.broker.presence
    original = store.refresh_node

    async def spy(node: str, ttl: float) -> bool:
        refreshed.append(trio.current_time())
        assert ttl == 20.0
        return await original(node, ttl)

    store.refresh_node = spy  # type: ignore[method-assign]
    await trio.sleep_until(45)
    assert refreshed == [10.0, 20.0, 30.0, 40.0]
    assert await store.reap() == []  # never expired


async def test_a_lost_lease_takes_a_new_incarnation_and_rejoins(autojump_clock, cluster):
    a, _ = await cluster.start("a")
    await cluster.start("b")
    conns = [FakeConn(f"a{i}") for i in range(2)]
    await join_all(a, conns)
    first = a.incarnation
    # Redis was out of reach for too long: the lease ran out at 13, and b's
    # reaper removed a's members at 15 (a cannot know until its refresh at 20).
    await trio.sleep_until(12)
    await cluster.broker.presence.register_node(first, 1.0)
    await trio.sleep_until(25)
    assert a.incarnation != first and a.incarnation.startswith("a:")
    assert [(at, kind) for at, kind, _ in cluster.recorder.seen] == [
        (0.0, "join"),
        (0.0, "join"),
        (15.0, "leave"),
        (15.0, "leave"),
        (20.0, "join"),
        (20.0, "join"),
    ]
    snapshot = await cluster.broker.presence.members(ORG, CHANNEL, 10)
    assert snapshot.total == 2
    assert await cluster.broker.presence.refresh_node(a.incarnation, 20.0)


async def test_a_lease_lost_before_any_reaper_saw_it_only_retags(autojump_clock, cluster):
    a, _ = await cluster.start("a")
    conns = [FakeConn(f"a{i}") for i in range(2)]
    await join_all(a, conns)
    first = a.incarnation
    await trio.sleep_until(12)
    await cluster.broker.presence.forget_node(first)  # gone, but nobody reaped
    await trio.sleep_until(60)
    assert a.incarnation != first
    assert [kind for _, kind, _ in cluster.recorder.seen] == ["join", "join"]


async def test_leaves_of_a_closed_connection_are_written_at_once(autojump_clock, cluster):
    a, _ = await cluster.start("a")
    conn, other = FakeConn("a0"), FakeConn("a1")
    await join_all(a, [conn, other])
    await trio.sleep_until(3)
    conn_channels = [CHANNEL]
    assert a.memberships(conn) == conn_channels
    a.closed(conn)  # synchronous, as a connection's cleanup is
    assert a.memberships(conn) == [] and a.queued_leaves == 1
    await trio.testing.wait_all_tasks_blocked()
    assert cluster.recorder.seen[-1] == (3.0, "leave", "a0")
    assert a.queued_leaves == 0
    assert [p["leave"]["conn"] for p in pushed(other)] == ["a0"]
    assert a._node.metrics.presence_members._value.get() == 1


async def test_a_stopping_node_writes_its_queued_leaves_and_drops_its_lease(
    autojump_clock, cluster
):
    a, a_scope = await cluster.start("a")
    conns = [FakeConn(f"a{i}") for i in range(3)]
    await join_all(a, conns)
    for conn in conns:
        a.closed(conn)
    a_scope.cancel()  # before the writer got to them
    await trio.testing.wait_all_tasks_blocked()
    assert [kind for _, kind, _ in cluster.recorder.seen] == ["join"] * 3 + ["leave"] * 3
    assert not await cluster.broker.presence.refresh_node(a.incarnation, 20.0)


async def test_a_join_cancels_its_own_queued_leave(autojump_clock, cluster):
    a, _ = await cluster.start("a")
    conn = FakeConn("a0")
    await join_all(a, [conn])
    a.dropped(conn, CHANNEL)  # e.g. a failed subscribe queued it
    await join_all(a, [conn])  # the member just stays
    await trio.testing.wait_all_tasks_blocked()
    assert [kind for _, kind, _ in cluster.recorder.seen] == ["join"]
    assert (await cluster.broker.presence.members(ORG, CHANNEL, 10)).total == 1
