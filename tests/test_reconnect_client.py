"""The reconnecting client (`apix_trio.reconnect`) against a server that restarts.

Servers run in process on a real redis-server (so what was published, and
the session records, outlive a server). A server "restarts" by leaving its
`running_server` block (graceful shutdown: every connection gets 1001) and a
new one starting on the same port; meanwhile the client retries with its
capped, jittered backoff (small here: 20-200 ms) and then resumes.

The application side is a task draining `events()`; the tests wait for what
they expect to arrive (never for time to pass) under `trio.fail_after`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from apix_trio.broker.events import Broker
from apix_trio.broker.redis.events import open_redis_broker
from apix_trio.client import ApixError
from apix_trio.reconnect import (
    ReconnectingClient,
    Resync,
    SubscriptionFailed,
    open_reconnecting_client,
)
from apix_trio.settings import BrokerSettings, ChannelOptions, Namespace, Settings
from tests.conftest import free_port
from tests.serverkit import Kit, running_server

pytestmark = pytest.mark.timeout(60)

NAMESPACES = (
    Namespace("small.>", ChannelOptions(history_size=5, history_ttl=3600)),
    Namespace("chat.>", ChannelOptions(history_size=1000, history_ttl=3600)),
)
BACKOFF = {"backoff_base": 0.02, "backoff_cap": 0.2}
TIMEOUT = 30.0


@attrs.define
class App:
    """What the application got from `events()`, in order."""

    items: list[Any] = attrs.Factory(list)
    changed: trio.Event = attrs.Factory(trio.Event)

    async def drain(self, client: ReconnectingClient) -> None:
        async for item in client.events():
            self.items.append(item)
            self.changed.set()
            self.changed = trio.Event()

    def ids(self, channel: str) -> list[str]:
        return [
            item["event"]["id"]
            for item in self.items
            if isinstance(item, dict) and item.get("push") == "event"
            if item["channel"] == channel
        ]

    async def wait_for(self, channel: str, ids: list[str]) -> None:
        """Until `channel`'s events end with `ids` (exact equality is asserted after)."""
        while self.ids(channel)[-len(ids) :] != ids:
            await self.changed.wait()


@asynccontextmanager
async def redis_publisher(redis_url: str, prefix: str) -> AsyncIterator[Broker]:
    """A broker of our own on the same Redis: publishes while no server runs."""
    settings = Settings(broker=BrokerSettings(redis_url=redis_url, key_prefix=prefix))
    async with open_redis_broker(settings) as broker:
        yield broker


async def publish(broker: Broker, kit: Kit, channel: str, count: int) -> list[str]:
    retention = kit.hub.namespaces.retention(channel)
    out = []
    for n in range(count):
        published = await broker.publish(
            "acme", channel, str(n), sender="svc", key=None, retention=retention
        )
        out.append(published.event.id)
    return out


def server_kwargs(redis_url: str, prefix: str, port: int = 0) -> dict[str, Any]:
    return {
        "broker": {"redis_url": redis_url, "key_prefix": prefix},
        "server": {"ws_port": port, "shutdown_grace": 2},
        "namespaces": NAMESPACES,
    }


def url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/ws"


async def test_resumes_across_a_server_restart_exactly_once(tmp_path: Path, redis_url: str):
    prefix, port = f"apixtest-{uuid.uuid4().hex[:8]}", free_port()
    kwargs = server_kwargs(redis_url, prefix, port)
    tokens: list[str] = []
    app = App()
    async with (
        redis_publisher(redis_url, prefix) as outside,
        open_reconnecting_client(url(port), tokens.pop, **BACKOFF) as client,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(app.drain, client)
        with trio.fail_after(TIMEOUT):
            async with running_server(tmp_path, **kwargs) as first:
                tokens.extend(first.token(sub="alice") for _ in range(20))
                await client.wait_connected()
                assert (await client.subscribe("chat.a"))["position"] == "0-0"
                await client.subscribe("chat.b")
                live_a = await publish(first.hub.broker, first, "chat.a", 5)
                live_b = await publish(first.hub.broker, first, "chat.b", 2)
                await app.wait_for("chat.a", live_a)
                await app.wait_for("chat.b", live_b)
                session = client.session
            # The first server is gone (graceful shutdown: 1001, sessions written).
            offline_a = await publish(outside, first, "chat.a", 7)
            offline_b = await publish(outside, first, "chat.b", 3)
            async with running_server(tmp_path, **kwargs) as second:
                await app.wait_for("chat.a", offline_a)
                await app.wait_for("chat.b", offline_b)
                after_a = await publish(second.hub.broker, second, "chat.a", 4)
                await app.wait_for("chat.a", after_a)
                assert client.session == session
                assert client.auth_result["resumed"] is True
                stats = client.statistics()
                assert (stats.connects, stats.resumes, stats.lost_sessions) == (2, 1, 0)
                nursery.cancel_scope.cancel()
    assert app.ids("chat.a") == live_a + offline_a + after_a
    assert app.ids("chat.b") == live_b + offline_b
    # Pushes only: 1001 and the resume surface no notice to the application.
    assert all(isinstance(item, dict) for item in app.items)


async def test_lost_session_resubscribes_from_positions_and_resyncs_what_is_gone(
    tmp_path: Path, redis_url: str
):
    prefix, port = f"apixtest-{uuid.uuid4().hex[:8]}", free_port()
    kwargs = server_kwargs(redis_url, prefix, port)
    tokens: list[str] = []
    app = App()
    async with (
        redis_publisher(redis_url, prefix) as outside,
        open_reconnecting_client(url(port), lambda: tokens[-1], **BACKOFF) as client,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(app.drain, client)
        with trio.fail_after(TIMEOUT):
            async with running_server(tmp_path, **kwargs) as first:
                tokens.append(first.token(sub="alice"))
                await client.wait_connected()
                await client.subscribe("chat.a")
                await client.subscribe("small.feed")
                seen = await publish(first.hub.broker, first, "small.feed", 2)
                await app.wait_for("small.feed", seen)
            offline_a = await publish(outside, first, "chat.a", 3)
            offline_small = await publish(outside, first, "small.feed", 12)  # keeps 5
            assert client.session is not None
            await outside.sessions.delete("acme", client.session)  # as if expired
            async with running_server(tmp_path, **kwargs) as second:
                await app.wait_for("chat.a", offline_a)
                await app.wait_for("small.feed", offline_small[-5:])
                live = await publish(second.hub.broker, second, "small.feed", 1)
                await app.wait_for("small.feed", live)
                stats = client.statistics()
                assert (stats.connects, stats.resumes, stats.lost_sessions) == (2, 0, 1)
                nursery.cancel_scope.cancel()
    assert app.ids("chat.a") == offline_a
    assert app.ids("small.feed") == seen + offline_small[-5:] + live
    # The notice sits right after the replayed events, before the live one.
    small = [
        item
        for item in app.items
        if isinstance(item, Resync) or (isinstance(item, dict) and item["channel"] == "small.feed")
    ]
    assert small.index(Resync("small.feed")) == len(seen) + 5
    assert Resync("chat.a") not in app.items


async def test_subscriptions_made_while_offline_and_refused_ones(tmp_path: Path, redis_url: str):
    prefix, port = f"apixtest-{uuid.uuid4().hex[:8]}", free_port()
    kwargs = server_kwargs(redis_url, prefix, port)
    tokens: list[str] = []
    app = App()
    async with (
        open_reconnecting_client(url(port), lambda: tokens[-1], **BACKOFF) as client,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(app.drain, client)
        with trio.fail_after(TIMEOUT):
            async with running_server(tmp_path, **kwargs) as first:
                tokens.append(first.token(sub="alice", subs=("chat.>", "secret.>")))
                await client.wait_connected()
                await client.subscribe("secret.plans")
            await client.subscribe("chat.later")  # made on the next connection
            # The next token may no longer read secret.>.
            tokens.append(first.token(sub="alice", subs=("chat.>",)))
            async with running_server(tmp_path, **kwargs) as second:
                while not any(isinstance(item, SubscriptionFailed) for item in app.items):
                    await app.changed.wait()
                # Made on reconnect already, or now: either way the server has
                # it once this returns a result.
                while await client.subscribe("chat.later") is None:
                    await client.wait_connected()
                (live,) = await publish(second.hub.broker, second, "chat.later", 1)
                await app.wait_for("chat.later", [live])
                nursery.cancel_scope.cancel()
    failed = [item for item in app.items if isinstance(item, SubscriptionFailed)]
    assert failed == [SubscriptionFailed("secret.plans", None, "forbidden", failed[0].message)]


async def test_a_refused_subscribe_raises_and_is_forgotten(tmp_path: Path):
    async with running_server(tmp_path) as kit:
        token = kit.token(sub="alice", subs=("chat.>",))
        async with open_reconnecting_client(kit.url, lambda: token, **BACKOFF) as client:
            with trio.fail_after(TIMEOUT):
                await client.wait_connected()
                with pytest.raises(ApixError) as info:
                    await client.subscribe("secret.x")
                assert info.value.code == "forbidden"
                published = await client.publish("chat.x", {"n": 1})
                assert published["duplicate"] is False
