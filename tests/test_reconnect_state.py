"""State subscriptions of the reconnecting client (`apix_trio.clients.statesync`).

End to end: servers run in process on a real redis-server and "restart" by
leaving their `running_server` block (graceful shutdown, 1001) while a
second broker on the same Redis changes state meanwhile; the client resumes
and the application gets a `StateSnapshot` exactly when it missed versions,
then gapless pushes. The gap logic inside one connection (a push that skips
versions: a `state.get` in stream order, later pushes held until it answers)
is pinned with a fake control channel, since a healthy server never skips.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from apix_trio.broker.events import Broker
from apix_trio.broker.state import StateLimits
from apix_trio.clients.client import ApixClosed, ApixError, Client, Frame
from apix_trio.clients.reconnect import (
    ReconnectingClient,
    StateSnapshot,
    StateSubscriptionFailed,
    open_reconnecting_client,
)
from apix_trio.clients.statesync import StateSubscriptions
from tests.conftest import free_port
from tests.serverkit import running_server
from tests.test_reconnect_client import BACKOFF, TIMEOUT, App, redis_publisher, server_kwargs, url

pytestmark = pytest.mark.timeout(60)

KEY = "doc.shared"


def of_key(app: App, key: str = KEY) -> list[Any]:
    """The application's state items of `key`: snapshots and pushes (version, kind)."""
    out: list[Any] = []
    for item in app.items:
        if isinstance(item, StateSnapshot) and item.key == key:
            out.append(item)
        elif isinstance(item, dict) and item.get("push") == "state" and item["key"] == key:
            out.append(item)
    return out


def version_of(item: Any) -> int:
    return item.version if isinstance(item, StateSnapshot) else int(item["version"])


async def wait_version(app: App, client: ReconnectingClient, version: int, key: str = KEY) -> None:
    while client.state_versions.get(key) != version:
        await app.changed.wait()


async def change(broker: Broker, op: str, value: Any, key: str = KEY) -> int:
    text = orjson.dumps(value).decode()
    if op == "set":
        return await broker.state.set(
            "acme", key, text, version=None, sender="svc", limits=StateLimits()
        )
    return await broker.state.patch(
        "acme", key, text, version=None, sender="svc", limits=StateLimits()
    )


async def test_a_resume_hands_a_snapshot_only_when_versions_were_missed(
    tmp_path: Path, redis_url: str
) -> None:
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
                assert await client.state_subscribe(KEY) == {"value": None, "version": 0}
                assert (await client.state_set(KEY, {"a": 1}))["version"] == 1
                assert (await client.state_patch(KEY, {"b": 2}))["version"] == 2
                await wait_version(app, client, 2)
            # Server gone: two changes the client misses.
            await change(outside, "set", {"c": 3})
            await change(outside, "patch", {"d": 4})
            async with running_server(tmp_path, **kwargs) as second:
                await wait_version(app, client, 4)
                assert client.auth_result["resumed"] is True
                assert client.auth_result["state"] == [
                    {"key": KEY, "version": 4, "value": {"c": 3, "d": 4}}
                ]
                assert (await client.state_patch(KEY, {"e": 5}))["version"] == 5
                await wait_version(app, client, 5)
            # Gone again, nothing changes: the resume needs no snapshot.
            async with running_server(tmp_path, **kwargs):
                while True:
                    try:
                        deleted = await client.state_delete(KEY, version=5)
                    except ApixClosed:
                        continue  # still the connection to the server that went away
                    break
                assert deleted == {"version": 6}
                await wait_version(app, client, 6)
                assert client.statistics().resumes == 2
                nursery.cancel_scope.cancel()
    assert second.hub is not None
    items = of_key(app)
    assert items[0] == StateSnapshot(KEY, None, 0)
    assert [item["version"] for item in items[1:3]] == [1, 2]
    assert items[3] == StateSnapshot(KEY, {"c": 3, "d": 4}, 4)
    assert items[4] == {"push": "state", "key": KEY, "version": 5, "patch": {"e": 5}}
    assert items[5] == {"push": "state", "key": KEY, "version": 6, "value": None}
    assert len(items) == 6


async def test_a_lost_session_subscribes_again_and_a_refused_key_is_reported(
    tmp_path: Path, redis_url: str
) -> None:
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
                await client.state_subscribe(KEY)
                await client.state_subscribe("secret.plan")
                await client.state_set(KEY, 1)
                await wait_version(app, client, 1)
            await change(outside, "set", 2)
            assert client.session is not None
            await outside.sessions.delete("acme", client.session)  # as if expired
            tokens.append(first.token(sub="alice", state=("doc.>",)))
            async with running_server(tmp_path, **kwargs) as second:
                await wait_version(app, client, 2)
                while not any(isinstance(i, StateSubscriptionFailed) for i in app.items):
                    await app.changed.wait()
                await change(second.hub.broker, "patch", {"x": 1})
                await wait_version(app, client, 3)
                assert client.statistics().lost_sessions == 1
                with pytest.raises(ApixError) as info:
                    await client.state_subscribe("secret.other")
                assert info.value.code == "forbidden"
                nursery.cancel_scope.cancel()
    assert [version_of(item) for item in of_key(app)] == [0, 1, 2, 3]
    assert of_key(app)[2] == StateSnapshot(KEY, 2, 2)
    failed = [i for i in app.items if isinstance(i, StateSubscriptionFailed)]
    assert failed == [StateSubscriptionFailed("secret.plan", "forbidden", failed[0].message)]
    assert set(client.state_versions) == {KEY}


# -- the gap logic, with a fake control channel ------------------------------------------


class FakeControl:
    """Records control frames; the test answers them when it likes."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any], Any]] = []

    async def __call__(
        self,
        client: Client,
        op: str,
        *,
        wait: bool = True,
        on_reply: Any = None,
        retry_transient: bool = False,
        **fields: Any,
    ) -> Frame:
        await trio.lowlevel.checkpoint()
        self.retry_transient = retry_transient
        self.sent.append((op, fields, on_reply))
        return {}


def push(version: int, **body: Any) -> Frame:
    return {"push": "state", "key": "k", "version": version, **body}


async def test_a_push_that_skips_versions_gets_a_state_get_and_later_pushes_wait() -> None:
    handed: list[Any] = []

    async def hand(item: Any) -> None:
        handed.append(item)

    control = FakeControl()
    subs = StateSubscriptions(hand, control)
    client: Any = object()
    subs.want("k")
    assert await subs.on_push(client, push(1, value=1)) is False  # no value yet: not ours
    await subs.subscribe_on(client, "k")
    ((op, fields, on_reply),) = control.sent
    assert (op, fields) == ("state.subscribe", {"key": "k"})
    assert control.retry_transient  # a transient refusal is retried, never dropped
    await on_reply({"id": 1, "ok": True, "result": {"value": {"a": 1}, "version": 3}})
    assert handed == [StateSnapshot("k", {"a": 1}, 3)]

    assert await subs.on_push(client, push(3, value=0)) is True  # had it: dropped
    assert await subs.on_push(client, push(4, patch={"b": 2})) is True
    assert handed[-1] == push(4, patch={"b": 2})
    # v5 never came: v6 starts a resync; v7 and v5-late wait for its answer.
    await subs.on_push(client, push(6, patch={"c": 3}))
    assert control.sent[-1][:2] == ("state.get", {"key": "k"})
    await subs.on_push(client, push(7, patch={"d": 4}))
    await subs.on_push(client, push(8, value="x"))
    assert len(handed) == 2
    await control.sent[-1][2]({"ok": True, "result": {"value": {"a": 1, "c": 3}, "version": 7}})
    assert handed[2:] == [StateSnapshot("k", {"a": 1, "c": 3}, 7), push(8, value="x")]
    assert subs.versions() == {"k": 8}
    assert await subs.on_push(client, push(9, value="y")) is True
    assert handed[-1] == push(9, value="y")
    # Other keys are not its business.
    assert await subs.on_push(client, {"push": "state", "key": "other", "version": 1}) is False
    # A disconnect forgets a resync in flight; the next value restarts the copy.
    await subs.on_push(client, push(12, value="z"))
    subs.disconnected()
    assert await subs.on_push(client, push(10, value="late")) is True  # 10 == 9 + 1
    assert handed[-1] == push(10, value="late")
