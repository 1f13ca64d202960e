"""Redis misbehaving under two real `apix-trio serve` processes.

A publisher on node A publishes one event at a time (so every reply is
bounded on its own) while a subscriber on node B listens; then Redis

- (a) is killed with SIGKILL and restarted from its AOF (`appendfsync
  always`): nothing that got an id is lost, the subscriber receives every
  stored event once and in order (the bus reader resumes from its last
  id), the publisher gets `unavailable` only while Redis is down, each
  reply within the protocol's 5 s, its connection stays open, and
  `/api/v1/ready` is 503 while Redis is down and 200 after;
- (b) is paused with SIGSTOP (the socket stays open, nothing answers):
  publishes answer `unavailable` within 5 s, pings keep working, readiness
  goes 503, and after SIGCONT publishes succeed again and flow to the
  subscriber, on the same connections; publishes a client pipelined into
  the stall are each answered within 5 s of being sent, too.

Waiting on the external processes (Redis restarting, a node noticing) is
done by polling a condition under `fail_after`; the only timing assertion
is the protocol's own bound on a reply (`UNAVAILABLE_WITHIN`).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tests.conftest import RedisServer, RedisServerFactory
from tests.memws import MemClient
from tests.procs import NodeProcess, call_keeping, open_node

pytestmark = pytest.mark.timeout(150)

SETTINGS = {
    "defaults.history_size": 100_000,
    "limits.ops_per_second": 1_000_000,
}
CHANNEL = "feed.faults"
UNAVAILABLE_WITHIN = 5.0  # PROTOCOL.md: `unavailable` comes within 5 s
MAX_PUBLISHES = 50_000  # a bound on the publish loop, never reached when all is well
POLL_INTERVAL = 0.05


@attrs.define
class Progress:
    """Lets the test wait for a condition that the client tasks advance."""

    _changed: trio.Event = attrs.Factory(trio.Event)

    def bump(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._changed.wait()


@attrs.frozen
class Outcome:
    n: int
    sent_at: float
    replied_at: float
    id: str | None
    """None: `unavailable`."""


@attrs.define
class Publisher:
    """Publishes `{"n": n}` one at a time until told to stop; every reply
    must be a success or `unavailable`, within UNAVAILABLE_WITHIN."""

    client: MemClient
    progress: Progress
    outcomes: list[Outcome] = attrs.Factory(list)
    stop: trio.Event = attrs.Factory(trio.Event)
    finished: trio.Event = attrs.Factory(trio.Event)

    def acked(self, after: float = float("-inf")) -> list[Outcome]:
        return [o for o in self.outcomes if o.id is not None and o.sent_at > after]

    def unavailable(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.id is None]

    async def publish(self, n: int) -> Outcome:
        sent_at = trio.current_time()
        await self.client.send({"op": "publish", "id": n, "channel": CHANNEL, "data": {"n": n}})
        with trio.fail_after(UNAVAILABLE_WITHIN):
            reply = await self.client.recv()
        assert reply is not None, f"the publisher was closed with {self.client.close_code}"
        assert reply["id"] == n, reply
        if reply["ok"]:
            event_id = reply["result"]["id"]
        else:
            assert reply["error"]["code"] == "unavailable", reply
            event_id = None
        outcome = Outcome(n, sent_at, trio.current_time(), event_id)
        self.outcomes.append(outcome)
        self.progress.bump()
        return outcome

    async def run(self) -> None:
        """Publish until `stop` (then set `finished`, the last reply in)."""
        for n in range(1, MAX_PUBLISHES):
            if self.stop.is_set():
                self.finished.set()
                return
            await self.publish(n)
        raise AssertionError("the publisher was never told to stop")


@attrs.define
class Subscriber:
    client: MemClient
    progress: Progress
    events: list[dict[str, Any]] = attrs.Factory(list)
    replies: dict[int, dict[str, Any]] = attrs.Factory(dict)

    def ids(self) -> list[str]:
        return [event["id"] for event in self.events]

    async def run(self) -> None:
        while True:
            frame = await self.client.recv()
            assert frame is not None, f"the subscriber was closed with {self.client.close_code}"
            if frame.get("push") == "event":
                assert frame["channel"] == CHANNEL
                self.events.append(frame["event"])
            elif "id" in frame:
                self.replies[frame["id"]] = frame
            self.progress.bump()

    async def ping(self, frame_id: int) -> None:
        """A ping while `run` reads: the connection is open and answers."""
        await self.client.send({"op": "ping", "id": frame_id})
        await self.progress.until(lambda: frame_id in self.replies)
        assert self.replies[frame_id]["ok"], self.replies[frame_id]


async def poll_until(check: Callable[[], Awaitable[bool]], within: float) -> None:
    """Poll an external process's state until `check()`; TooSlowError after `within`."""
    with trio.fail_after(within):
        for _ in range(math.ceil(within / POLL_INTERVAL) + 1):
            if await check():
                return
            await trio.sleep(POLL_INTERVAL)
    raise trio.TooSlowError


def ready_is(nodes: tuple[NodeProcess, ...], status: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        for node in nodes:
            got, body = await node.http_get("/api/v1/ready")
            assert got in (200, 503), (got, body)
            if got != status:
                return False
            assert body["ready"] is (status == 200), body
        return True

    return check


async def full_history(client: MemClient) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    since = "0"
    for _ in range(200):
        reply = await client.call("history", channel=CHANNEL, since=since, limit=1000)
        assert reply["ok"], reply
        page = reply["result"]["events"]
        events.extend(page)
        if len(page) < 1000:
            return events
        since = page[-1]["id"]
    raise AssertionError("history never ended")


async def assert_alive(*clients: MemClient) -> None:
    """Each connection is open and answers (pushes on the way are kept)."""
    for client in clients:
        assert client.close_code is None
        assert (await call_keeping(client, "ping", []))["ok"]


def check_stream(
    publisher: Publisher, subscriber: Subscriber, history: list[dict[str, Any]]
) -> None:
    """Nothing acknowledged is missing; nothing is doubled; each stored event
    is one the publisher sent (acknowledged, or answered `unavailable`: its
    outcome is unknown to the client, PROTOCOL.md)."""
    history_ids = [event["id"] for event in history]
    assert len(set(history_ids)) == len(history_ids)
    assert history_ids == sorted(history_ids, key=lambda i: tuple(map(int, i.split("-"))))
    acked = {o.id: o.n for o in publisher.acked()}
    unanswered = {o.n for o in publisher.unavailable()}
    assert set(acked) <= set(history_ids), set(acked) - set(history_ids)
    for event in history:
        n = event["data"]["n"]
        assert acked.get(event["id"], n) == n, event
        assert event["id"] in acked or n in unanswered, event
    # Live delivery on the other node: exactly the stored stream, in order.
    assert subscriber.ids() == history_ids
    assert subscriber.events == history


def node_settings(name: str, redis: RedisServer) -> dict[str, Any]:
    return {"name": name, "redis_url": redis.url, "settings": SETTINGS}


async def test_redis_sigkill_and_aof_restart_lose_nothing_acknowledged(
    tmp_path: Path, redis_server_factory: RedisServerFactory
) -> None:
    redis = redis_server_factory(appendonly=True, args=("--appendfsync", "always"))
    key_dir = tmp_path / "keys"
    async with (
        open_node(key_dir, **node_settings("node-a", redis)) as a,
        open_node(key_dir, **node_settings("node-b", redis)) as b,
    ):
        nodes = (a, b)
        with trio.fail_after(100):
            progress = Progress()
            subscriber = Subscriber(await b.connect(sub="reader"), progress)
            assert (await subscriber.client.call("subscribe", channel=CHANNEL))["ok"]
            publisher = Publisher(await a.connect(sub="writer"), progress)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(publisher.run)
                nursery.start_soon(subscriber.run)
                await progress.until(lambda: len(subscriber.events) >= 50)

                killed_at = trio.current_time()
                await trio.to_thread.run_sync(redis.kill)
                await poll_until(ready_is(nodes, 503), within=15)
                await progress.until(lambda: len(publisher.unavailable()) >= 5)
                assert await ready_is(nodes, 503)()  # still down, still not ready

                await trio.to_thread.run_sync(redis.start)  # returns once it answers PING
                up_at = trio.current_time()
                await poll_until(ready_is(nodes, 200), within=15)
                await progress.until(lambda: len(publisher.acked(after=up_at)) >= 50)
                publisher.stop.set()
                await publisher.finished.wait()
                last = publisher.acked()[-1].id
                await progress.until(lambda: last in subscriber.ids())
                nursery.cancel_scope.cancel()

            await assert_alive(publisher.client, subscriber.client)
            history = await full_history(await b.connect(sub="historian"))

    # `unavailable` only while Redis was down: answered after the kill, sent
    # before Redis answered again. And there was such a window.
    unavailable = publisher.unavailable()
    assert unavailable
    assert all(o.replied_at >= killed_at and o.sent_at <= up_at for o in unavailable)
    assert publisher.acked(after=up_at)
    check_stream(publisher, subscriber, history)
    for node in nodes:
        # Each node noticed (its batches or PING, or its bus reader).
        assert node.events("redis_unavailable") or node.events("redis_bus_read_failed")
        assert not node.problems(), node.problems()
        assert not node.tracebacks(), node.tracebacks()


async def test_redis_sigstop_publishes_unavailable_within_bound_then_recover(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    key_dir = tmp_path / "keys"
    async with (
        open_node(key_dir, **node_settings("node-a", redis_server)) as a,
        open_node(key_dir, **node_settings("node-b", redis_server)) as b,
    ):
        nodes = (a, b)
        with trio.fail_after(100):
            progress = Progress()
            subscriber = Subscriber(await b.connect(sub="reader"), progress)
            assert (await subscriber.client.call("subscribe", channel=CHANNEL))["ok"]
            publisher = Publisher(await a.connect(sub="writer"), progress)
            other = Publisher(await a.connect(sub="other-writer"), progress)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(subscriber.run)
                for n in range(1, 21):
                    assert (await publisher.publish(n)).id is not None

                paused_at = trio.current_time()
                redis_server.pause()
                # Two connections at once, each publish answered within the bound.
                async with trio.open_nursery() as both:
                    for client, first in ((publisher, 21), (other, 1001)):
                        both.start_soon(_publish_unavailable, client, first, 3)
                await assert_alive(publisher.client, other.client)
                await subscriber.ping(1)
                await poll_until(ready_is(nodes, 503), within=15)

                redis_server.resume()
                # The first publish after SIGCONT already succeeds.
                for n in range(31, 51):
                    assert (await publisher.publish(n)).id is not None
                await poll_until(ready_is(nodes, 200), within=15)
                last = publisher.acked()[-1].id
                await progress.until(lambda: last in subscriber.ids())
                nursery.cancel_scope.cancel()

            await assert_alive(publisher.client, other.client, subscriber.client)
            history = await full_history(await b.connect(sub="historian"))

    assert all(o.sent_at >= paused_at for o in publisher.unavailable() + other.unavailable())
    # Both publishers' events are in one stream; check it as one.
    merged = Publisher(publisher.client, progress, publisher.outcomes + other.outcomes)
    check_stream(merged, subscriber, history)
    for node in nodes:
        assert not node.problems(), node.problems()
        assert not node.tracebacks(), node.tracebacks()


async def _publish_unavailable(publisher: Publisher, first: int, count: int) -> None:
    for n in range(first, first + count):
        outcome = await publisher.publish(n)
        assert outcome.id is None, outcome


async def test_pipelined_publishes_into_a_stalled_redis_each_answer_within_bound(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Each publish a client pipelined into a stalled Redis is answered
    `unavailable` within the bound counted from when it was sent, not one
    operation timeout after another (a connection runs its ops in order)."""
    late: list[int] = []
    async with open_node(tmp_path / "keys", **node_settings("node-a", redis_server)) as a:
        with trio.fail_after(60):
            client = await a.connect(sub="writer")
            assert (await client.call("publish", channel=CHANNEL, data=0))["ok"]
            redis_server.pause()
            sent_at: dict[int, float] = {}
            for n in (1, 2):
                sent_at[n] = trio.current_time()
                await client.send({"op": "publish", "id": n, "channel": CHANNEL, "data": n})
            for n in (1, 2):
                try:
                    with trio.fail_at(sent_at[n] + UNAVAILABLE_WITHIN):
                        reply = await client.recv()
                except trio.TooSlowError:
                    late.append(n)
                    reply = await client.recv()
                assert reply is not None and reply["id"] == n, reply
                assert reply["error"]["code"] == "unavailable", reply
    assert not late, f"publishes {late} were answered more than {UNAVAILABLE_WITHIN} s after sent"
