"""Cancellation consistency: a connection cut at any point leaves nothing behind.

Each case stops a connection in the middle of an operation, at a point made
deterministic by a gate in front of the broker (the op worker is known to be
waiting inside `publish`, `position`, `read_after`, ...) or by a client that
stopped reading (the replay is known to be waiting for outbox room). Then
the connection is ended one of three ways: the client hangs up (EOF), the
client sends a close frame, or the server cancels the connection's task
from outside (as its nursery's shutdown deadline would).

Afterwards the router, the connection registry, the per-org counts and the
`apix_connections` / `apix_subscriptions` gauges are back to zero, exactly
one close was counted, and the task tree is the same as before the
connection (no task leaked). Everything runs in memory on a MockClock.
"""

from __future__ import annotations

import gc
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
import orjson
import pytest
import structlog.testing
import trio
import trio.testing
from wsproto.events import CloseConnection

from apix_trio.gateway import handshake as gateway
from apix_trio.gateway.handshake import handle_stream
from apix_trio.gateway.hub import Hub
from apix_trio.settings import ChannelOptions, Namespace
from tests.checks import assert_hub_idle, sample, sum_closes
from tests.memws import MemClient, memory_hub
from tests.test_slow_consumer import pipe_pair

pytestmark = pytest.mark.timeout(60)

CHANNEL = "big.feed"
HISTORY = 600  # more than one replay page (500)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


# -- a broker with gates ----------------------------------------------------------


@attrs.define
class Gate:
    entered: trio.Event = attrs.field(factory=trio.Event)
    release: trio.Event = attrs.field(factory=trio.Event)


class GatedBroker:
    """Forwards everything to the real broker; a gated method first waits at
    its gate (`before`), or right after the real call returned (`after`)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.gates: dict[tuple[str, str], Gate] = {}

    def gate(self, method: str, when: str = "before") -> Gate:
        gate = Gate()
        self.gates[(method, when)] = gate
        return gate

    async def _pass(self, method: str, when: str) -> None:
        gate = self.gates.get((method, when))
        if gate is not None:
            gate.entered.set()
            await gate.release.wait()

    def _gated(self, method: str) -> Callable[..., Any]:
        real = getattr(self._inner, method)

        async def call(*args: Any, **kwargs: Any) -> Any:
            await self._pass(method, "before")
            result = await real(*args, **kwargs)
            await self._pass(method, "after")
            return result

        return call

    def __getattr__(self, name: str) -> Any:
        if name in ("publish", "read_after", "read_latest", "position"):
            return self._gated(name)
        return getattr(self._inner, name)


# -- the task tree ------------------------------------------------------------------


def task_names() -> Counter[str]:
    """Every task under the root, by name (a multiset)."""
    names: Counter[str] = Counter()
    root = trio.lowlevel.current_root_task()
    assert root is not None
    stack = [root]
    while stack:
        task = stack.pop()
        names[task.name] += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return names


# -- the victim -----------------------------------------------------------------------


@attrs.define
class Victim:
    client: MemClient
    scope: trio.CancelScope
    done: trio.Event
    finished_at: list[float]


async def connect_victim(hub: Hub, nursery: trio.Nursery, *, capacity: int) -> Victim:
    client_stream, server_stream = pipe_pair(capacity)
    scope = trio.CancelScope()
    done = trio.Event()
    finished_at: list[float] = []

    async def serve() -> None:
        with scope:
            await handle_stream(hub, server_stream)
        finished_at.append(trio.current_time())
        done.set()

    nursery.start_soon(serve)
    client = MemClient(client_stream)
    await client.handshake([])
    return Victim(client, scope, done, finished_at)


async def end(victim: Victim, how: str) -> None:
    if how == "hang_up":
        await victim.client.stream.aclose()
    elif how == "close_frame":
        await victim.client.stream.send_all(victim.client.ws.send(CloseConnection(code=1000)))
    else:
        victim.scope.cancel()


def assert_no_trace(hub: Hub, *, others: int) -> None:
    """Only the `others` helper connections remain, with no subscription,
    and no timer entry is left (`others` is 0 wherever timers are checked)."""
    assert_hub_idle(hub, others=others)
    assert hub.router.statistics().channels == 0
    if others == 0:
        assert len(hub.timers) == 0


# -- the cases ------------------------------------------------------------------------


@attrs.define
class Point:
    """Where the victim is stopped: a broker gate and the op that reaches it."""

    method: str | None  # None: stopped by back-pressure, not by a gate
    when: str
    op: dict[str, Any]
    needs_history: bool = False
    subscribed: tuple[str, ...] = ()  # live subscriptions made before the op


POINTS = {
    "publish_before_store": Point("publish", "before", {"op": "publish", "data": 1}),
    "publish_after_store": Point("publish", "after", {"op": "publish", "data": 1}),
    "subscribe_position": Point("position", "before", {"op": "subscribe"}),
    "subscribe_replay_read": Point(
        "read_after", "before", {"op": "subscribe", "since": "0"}, needs_history=True
    ),
    "subscribe_second_page": Point(
        "read_after", "after", {"op": "subscribe", "since": "0"}, needs_history=True
    ),
    "history": Point("read_latest", "before", {"op": "history"}, needs_history=True),
    "replay_backpressure": Point(None, "", {"op": "subscribe", "since": "0"}, needs_history=True),
    # Live subscriptions are removed by the connection's cleanup, not by the op.
    "publish_with_live_subscriptions": Point(
        "publish", "before", {"op": "publish", "data": 1}, subscribed=("big.other", CHANNEL)
    ),
    "subscribe_beside_a_live_one": Point(
        "position", "before", {"op": "subscribe"}, subscribed=("big.other",)
    ),
}


async def fill_history(hub: Hub) -> None:
    retention = hub.namespaces.retention(CHANNEL)
    for n in range(HISTORY):
        await hub.broker.publish(
            "acme", CHANNEL, str(n), sender="seed", key=None, retention=retention
        )


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One development key pair for the module (generating one per test is slow)."""
    return str(tmp_path_factory.mktemp("keys"))


def hub_settings(key_dir: str) -> dict[str, Any]:
    return {
        "auth": {"dev_key_dir": key_dir},
        "limits": {"outbox_size": 16, "ops_per_second": 1e6},
        "heartbeat": {"interval": 1e6},
        "namespaces": (Namespace("big.>", ChannelOptions(history_size=5000, history_ttl=3600)),),
    }


@pytest.mark.parametrize("how", ["hang_up", "close_frame", "cancel_task"])
@pytest.mark.parametrize("point_name", list(POINTS))
async def test_cut_mid_operation_leaves_nothing_behind(
    tmp_path, autojump_clock, key_dir, point_name, how
):
    point = POINTS[point_name]
    async with memory_hub(tmp_path, **hub_settings(key_dir)) as mem:
        hub = mem.hub
        others = 0
        if point.needs_history:
            await fill_history(hub)
        gated = GatedBroker(hub.broker)
        hub.broker = gated  # type: ignore[assignment]
        closes_before = sum_closes(hub.metrics)

        async with trio.open_nursery() as nursery:
            await trio.testing.wait_all_tasks_blocked()
            baseline = task_names()
            # A stalled client for the back-pressure point: the server's writes
            # block as soon as 16 bytes are unread.
            capacity = 16 if point.method is None else 1 << 20
            victim = await connect_victim(hub, nursery, capacity=capacity)
            token = mem.token()
            reply = await victim.client.call("auth", token=token)
            assert reply["ok"], reply
            for channel in point.subscribed:
                assert (await victim.client.call("subscribe", channel=channel))["ok"]
            gate = gated.gate(point.method, point.when) if point.method else None
            frame = {**point.op, "id": 1, "channel": CHANNEL}
            await victim.client.send(orjson.dumps(frame).decode())
            if gate is not None:
                await gate.entered.wait()
            await trio.testing.wait_all_tasks_blocked()
            conn = next(c for c in hub.registry if c.identity and c.identity.sub == "alice")
            if point.method is None:
                # The replay is parked waiting for outbox room, mid-history.
                assert len(conn.outbox) > 0
                assert CHANNEL in conn.subscriptions
            subscribing = 1 if point.op["op"] == "subscribe" else 0
            assert hub.router.statistics().subscriptions == len(point.subscribed) + subscribing
            assert sample(hub.metrics, "apix_subscriptions") == len(point.subscribed) + subscribing
            assert sample(hub.metrics, "apix_connections") == others + 1

            await end(victim, how)
            await victim.done.wait()
            if gate is not None:
                gate.release.set()

        await trio.testing.wait_all_tasks_blocked()
        assert task_names() == baseline
        assert_no_trace(hub, others=others)
        assert sum_closes(hub.metrics) == closes_before + 1
        if point_name == "publish_after_store":
            history = await gated.read_latest(
                "acme", CHANNEL, 10, hub.namespaces.retention(CHANNEL)
            )
            assert len(history.events) == 1  # stored, just never acknowledged
        if point_name == "publish_before_store":
            history = await gated.read_latest(
                "acme", CHANNEL, 10, hub.namespaces.retention(CHANNEL)
            )
            assert history.events == ()


async def test_cancel_with_a_stuck_write_ends_at_the_send_timeout(
    tmp_path, autojump_clock, key_dir
):
    """Cancelling from outside cannot interrupt a shielded write; it ends at
    its own send timeout, and then everything is gone."""
    async with memory_hub(tmp_path, **hub_settings(key_dir)) as mem:
        hub = mem.hub
        await fill_history(hub)
        async with trio.open_nursery() as nursery:
            victim = await connect_victim(hub, nursery, capacity=16)
            assert (await victim.client.call("auth", token=mem.token()))["ok"]
            await victim.client.send({"op": "subscribe", "id": 1, "channel": CHANNEL, "since": "0"})
            await trio.testing.wait_all_tasks_blocked()
            stuck_since = trio.current_time()
            victim.scope.cancel()
            await victim.done.wait()
        assert victim.finished_at == [stuck_since + gateway.SEND_TIMEOUT]
        assert_no_trace(hub, others=0)


async def test_header_auth_connection_cancelled_at_once(tmp_path, autojump_clock, key_dir):
    """A connection authenticated by its upgrade header joins its org before
    its tasks start; cancelling it right there still leaves the org at zero."""
    async with memory_hub(tmp_path, **hub_settings(key_dir)) as mem:
        hub = mem.hub
        baseline = task_names()
        async with trio.open_nursery() as nursery:
            client_stream, server_stream = pipe_pair(1 << 20)
            nursery.start_soon(handle_stream, hub, server_stream)
            client = MemClient(client_stream)
            await client.handshake([(b"authorization", f"Bearer {mem.token()}".encode())])
            push = await client.recv()
            assert push is not None and push["push"] == "connected"
            assert hub.registry.org_count("acme") == 1
            nursery.cancel_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert task_names() == baseline
        assert_no_trace(hub, others=0)


# -- timers: a connection cut at any point of its timers' lives --------------------


TIMER_POINTS = {
    # where the connection is when it is cut -> the timer entries it holds then
    "before_the_upgrade": 0,
    "awaiting_auth": 2,  # first ping, auth timeout
    "authenticated": 2,  # first ping, token warning
    "ping_outstanding": 2,  # pong deadline, token warning
    "token_expiring_sent": 2,  # first ping, token expiry close
    "header_auth": 2,  # first ping, token warning
}


@pytest.mark.parametrize("how", ["hang_up", "close_frame", "cancel_task"])
@pytest.mark.parametrize("point", list(TIMER_POINTS))
async def test_cut_at_any_timer_point_leaves_no_timer_entry(
    tmp_path, autojump_clock, key_dir, point, how
):
    settings = hub_settings(key_dir)
    settings["heartbeat"] = {"interval": 20.0, "timeout": 15.0}
    settings["auth"] = {"dev_key_dir": key_dir, "timeout": 50.0, "expiry_warning": 30.0}
    async with memory_hub(tmp_path, **settings) as mem:
        hub = mem.hub
        await trio.testing.wait_all_tasks_blocked()
        baseline = task_names()
        assert len(hub.timers) == 0
        async with trio.open_nursery() as nursery:
            client_stream, server_stream = pipe_pair(1 << 20)
            scope = trio.CancelScope()
            done = trio.Event()

            async def serve() -> None:
                with scope:
                    await handle_stream(hub, server_stream)
                done.set()

            nursery.start_soon(serve)
            client = MemClient(client_stream)
            victim = Victim(client, scope, done, [])
            if point != "before_the_upgrade":
                headers = []
                if point == "header_auth":
                    headers = [(b"authorization", f"Bearer {mem.token(ttl=100)}".encode())]
                await client.handshake(headers)
                if point == "header_auth":
                    assert (await client.recv() or {}).get("push") == "connected"
                elif point != "awaiting_auth":
                    reply = await client.call("auth", token=mem.token(ttl=100))
                    assert reply["ok"], reply
                if point == "ping_outstanding":
                    client.answer_pings = False
                    assert await client.recv(until=lambda: bool(client.pings)) is None
                if point == "token_expiring_sent":
                    push = await client.recv()
                    assert push is not None and push["push"] == "token_expiring"
                await trio.testing.wait_all_tasks_blocked()
                conn = next(iter(hub.registry))
                alive = weakref.ref(conn)
                del conn
            else:
                await client.stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
                await trio.testing.wait_all_tasks_blocked()
                alive = None
            assert len(hub.timers) == TIMER_POINTS[point]
            if point == "before_the_upgrade" and how == "close_frame":
                # A close frame in the middle of the request head: more bytes
                # of a head that never ends (the handshake timeout ends it).
                await client.stream.send_all(b"\x88\x80\x00\x00\x00\x00")
            else:
                await end(victim, how)
            await done.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert len(hub.timers) == 0
        assert all(entry.callback is None for entry in hub.timers._heap)
        assert task_names() == baseline
        assert_no_trace(hub, others=0)
        if alive is not None:
            gc.collect()
            assert alive() is None, "something still holds the closed connection"


# -- helpers: they share the handler's nursery, but none outlives its connection ----


async def test_a_helper_error_ends_its_connection_only(tmp_path, autojump_clock, key_dir):
    """The op worker runs in the nursery the connection's task runs in (no
    nursery per connection). Its error must not reach that shared nursery:
    the connection closes with 1011, `handle_stream` logs the crash and
    returns, the other connection keeps working, and no task is left."""
    async with memory_hub(tmp_path, **hub_settings(key_dir)) as mem:
        hub = mem.hub
        real_commands = hub.commands

        async def commands(conn: Any, command: Any, received_at: float) -> None:
            if getattr(command, "channel", "") == "big.boom":
                raise RuntimeError("boom")
            await real_commands(conn, command, received_at)

        hub.commands = commands
        async with trio.open_nursery() as nursery:
            await trio.testing.wait_all_tasks_blocked()
            baseline = task_names()
            bystander = await connect_victim(hub, nursery, capacity=1 << 20)
            victim = await connect_victim(hub, nursery, capacity=1 << 20)
            for client in (bystander.client, victim.client):
                assert (await client.call("auth", token=mem.token()))["ok"]
            with structlog.testing.capture_logs() as logs:
                boom = {"op": "publish", "id": 9, "channel": "big.boom", "data": 1}
                await victim.client.send(boom)
                assert await victim.client.recv() is None
                await victim.done.wait()
            assert victim.client.close_code == 1011
            assert [entry["event"] for entry in logs].count("connection_crashed") == 1
            assert (await bystander.client.call("publish", channel=CHANNEL, data=1))["ok"]
            assert len(hub.registry) == 1
            await end(bystander, "close_frame")
            await bystander.done.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert task_names() == baseline
        assert_no_trace(hub, others=0)
