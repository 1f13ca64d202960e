"""End to end with the project's own client (`apix_trio.client`, on trio-websocket).

Every call goes over a real socket to an in-process server; the client's
error mapping (`ApixError` codes, `ApixConnectError` statuses, `ApixClosed`
close codes) is checked against what the server really sends.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from apix_trio.client import ApixClosed, ApixConnectError, ApixError, Client, open_client
from apix_trio.settings import ChannelOptions, Namespace
from tests.serverkit import running_server

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 20.0


async def events(client: Client, count: int) -> list[dict[str, Any]]:
    return [(await client.next_push("event"))["event"] for _ in range(count)]


async def test_subscribe_publish_round_trip_and_header_auth(tmp_path):
    async with running_server(tmp_path) as kit:
        with trio.fail_after(TIMEOUT):
            async with (
                open_client(kit.url, kit.token(sub="alice")) as alice,
                open_client(kit.url, kit.token(sub="bob"), header_auth=True) as bob,
            ):
                assert alice.subprotocol == "apix.v1"
                assert (alice.org, alice.sub, alice.auth_result["resumed"]) == (
                    "acme",
                    "alice",
                    False,
                )
                assert (bob.org, bob.sub) == ("acme", "bob") and bob.conn and bob.session
                subscribed = await alice.subscribe("chat.room1")
                assert subscribed == {
                    "channel": "chat.room1",
                    "position": "0-0",
                    "recovered": True,
                    "replayed": 0,
                }
                published = await bob.publish("chat.room1", {"text": "hi"})
                assert published["duplicate"] is False
                push = await alice.next_push("event")
                assert push["channel"] == "chat.room1"
                assert push["event"]["id"] == published["id"]
                assert push["event"]["ts"] == published["ts"]
                assert (push["event"]["data"], push["event"]["from"]) == ({"text": "hi"}, "bob")
                assert await alice.unsubscribe("chat.room1") == {}
                await bob.publish("chat.room1", "unseen")
                assert await alice.ping() == {}  # nothing queued in between
                assert await bob.ping() == {}


async def test_concurrent_calls_on_one_client_and_ordered_delivery(tmp_path):
    async with running_server(tmp_path, limits={"ops_per_second": 1e6}) as kit:
        with trio.fail_after(TIMEOUT):
            async with (
                open_client(kit.url, kit.token(sub="sub")) as sub,
                open_client(kit.url, kit.token(sub="pub")) as pub,
            ):
                await sub.subscribe("feed.c")
                replies: dict[int, str] = {}

                async def publish(n: int) -> None:
                    replies[n] = (await pub.publish("feed.c", n))["id"]

                async with trio.open_nursery() as nursery:
                    for n in range(50):
                        nursery.start_soon(publish, n)
                received = await events(sub, 50)
                assert len(set(replies.values())) == 50
                # Delivered in id order, each exactly once, with its own data.
                assert [e["id"] for e in received] == sorted(replies.values(), key=id_key)
                assert {e["data"]: e["id"] for e in received} == replies


def id_key(event_id: str) -> tuple[int, ...]:
    return tuple(int(part) for part in event_id.split("-"))


async def test_history_since_and_idempotency(tmp_path):
    async with running_server(tmp_path) as kit:
        with trio.fail_after(TIMEOUT):
            async with open_client(kit.url, kit.token()) as client:
                ids = [(await client.publish("feed.h", n))["id"] for n in range(10)]
                newest = await client.history("feed.h", limit=3)
                assert [e["data"] for e in newest["events"]] == [7, 8, 9]
                assert newest["position"] == ids[-1]
                after = await client.history("feed.h", since=ids[2], limit=4)
                assert [e["id"] for e in after["events"]] == ids[3:7]
                everything = await client.history("feed.h", since="0")
                assert [e["id"] for e in everything["events"]] == ids

                first = await client.publish("orders.1", {"v": 1}, key="order-1")
                again = await client.publish("orders.1", {"v": 2}, key="order-1")
                assert again == {**first, "duplicate": True}
                other = await client.publish("orders.2", {"v": 3}, key="order-1")
                assert other["duplicate"] is False  # keys are per channel
                stored = await client.history("orders.1")
                assert [e["data"] for e in stored["events"]] == [{"v": 1}]
                assert stored["events"][0]["key"] == "order-1"


async def test_resume_less_reconnect_catches_up_with_since(tmp_path):
    """A client that lost its connection reconnects as a fresh one and
    subscribes with `since` = the last id it saw: it gets exactly what it
    missed, then live events, nothing twice."""
    async with running_server(tmp_path) as kit:
        with trio.fail_after(TIMEOUT):
            async with open_client(kit.url, kit.token(sub="pub")) as pub:
                async with open_client(kit.url, kit.token(sub="reader")) as first:
                    await first.subscribe("feed.r")
                    before = [(await pub.publish("feed.r", n))["id"] for n in range(5)]
                    seen = await events(first, 5)
                    assert [e["id"] for e in seen] == before
                    last_seen = seen[-1]["id"]
                    session = first.session
                missed = [(await pub.publish("feed.r", n))["id"] for n in range(5, 12)]
                async with open_client(kit.url, kit.token(sub="reader")) as second:
                    assert second.session != session
                    assert second.auth_result["resumed"] is False
                    result = await second.subscribe("feed.r", since=last_seen)
                    assert result["recovered"] is True
                    assert result["replayed"] == len(missed)
                    assert result["position"] == missed[-1]
                    assert [e["id"] for e in await events(second, len(missed))] == missed
                    live = (await pub.publish("feed.r", "live"))["id"]
                    assert [e["id"] for e in await events(second, 1)] == [live]


async def test_refresh(tmp_path):
    async with running_server(tmp_path) as kit:
        with trio.fail_after(TIMEOUT):
            async with open_client(kit.url, kit.token("acme", "alice", ttl=600)) as client:
                old_exp = client.auth_result["exp"]
                refreshed = await client.refresh(kit.token("acme", "alice", ttl=7200))
                assert refreshed["exp"] > old_exp
                for token in (
                    kit.token("acme", "mallory"),
                    kit.token("globex", "alice"),
                    "not-a-jwt",
                ):
                    with pytest.raises(ApixError) as info:
                        await client.refresh(token)
                    assert info.value.code == "forbidden"
                assert await client.ping() == {}  # the old token is still in force


async def test_error_codes(tmp_path):
    async with running_server(
        tmp_path,
        limits={"max_subscriptions": 1},
        namespaces=(Namespace("system.>", ChannelOptions(client_publish=False)),),
    ) as kit:
        with trio.fail_after(TIMEOUT):
            token = kit.token(sub="carol", pub=("user.{sub}", "system.>"), subs=("news.*",))
            async with open_client(kit.url, token) as client:
                cases = [
                    (client.publish("user.dave", 1), "forbidden"),
                    (client.publish("system.alerts", 1), "forbidden"),
                    (client.subscribe("secret.x"), "forbidden"),
                    (client.history("secret.x"), "forbidden"),
                    (client.subscribe("bad..name"), "bad_request"),
                    (client.subscribe("news.a", since="yesterday"), "bad_request"),
                    (client.history("news.a", limit=0), "bad_request"),
                    (client.publish("user.carol", 1, key=""), "bad_request"),
                    (client.call("no.such.op"), "bad_request"),
                ]
                for call, code in cases:
                    with pytest.raises(ApixError) as info:
                        await call
                    assert info.value.code == code, (code, info.value.error)
                    assert info.value.message
                assert (await client.publish("user.carol", 1))["duplicate"] is False
                await client.subscribe("news.a")
                with pytest.raises(ApixError) as info:
                    await client.subscribe("news.b")
                assert info.value.code == "limit_exceeded"
                assert await client.ping() == {}


async def test_rate_limited_carries_retry_after(tmp_path):
    # 0.5 ops/s with a burst of 1: the second op within 2 s is refused.
    async with running_server(tmp_path, limits={"ops_per_second": 0.5}) as kit:
        with trio.fail_after(TIMEOUT):
            async with open_client(kit.url, kit.token()) as client:
                assert await client.ping() == {}
                with pytest.raises(ApixError) as info:
                    await client.ping()
                assert info.value.code == "rate_limited"
                assert info.value.retry_after is not None and 0 < info.value.retry_after <= 2


async def test_authentication_failures(tmp_path):
    async with running_server(tmp_path) as kit:
        with trio.fail_after(TIMEOUT):
            with pytest.raises(ApixError) as error:
                async with open_client(kit.url, "eyJhbGciOiJub25lIn0.e30."):
                    pass
            assert error.value.code == "unauthenticated"
            expired = kit.token(ttl=-3600)
            with pytest.raises(ApixConnectError) as rejected:
                async with open_client(kit.url, expired, header_auth=True):
                    pass
            assert rejected.value.status_code == 401
            with pytest.raises(ApixConnectError) as rejected:
                async with open_client(kit.url.replace("/ws", "/nope"), kit.token()):
                    pass
            assert rejected.value.status_code == 404
            with pytest.raises(ApixConnectError) as rejected:
                async with open_client(kit.url, kit.token(), subprotocol="other.v9"):
                    pass
            assert rejected.value.status_code == 400
        assert len(kit.hub.registry) == 0


async def test_server_close_reaches_calls_and_pushes(tmp_path):
    async with running_server(tmp_path) as kit:
        with trio.fail_after(TIMEOUT):
            async with open_client(kit.url, kit.token()) as client:
                await client.subscribe("feed.z")
                kit.running.shutdown()
                closed = await client.wait_closed()
                assert closed.code == 1001
                assert client.close_code == 1001
                with pytest.raises(ApixClosed) as info:
                    await client.ping()
                assert info.value.code == 1001
                with pytest.raises(ApixClosed):
                    await client.next_push()
