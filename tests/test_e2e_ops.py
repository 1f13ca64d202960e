"""End to end over real sockets with the `websockets` library: every op and error."""

from __future__ import annotations

import orjson
import pytest
from websockets.exceptions import InvalidStatus

from tests.serverkit import running_server
from tests.wsclient import RawClient

pytestmark = pytest.mark.timeout(60)


async def authed(kit, org="acme", sub="alice", **claims) -> RawClient:  # type: ignore[no-untyped-def]
    client = await RawClient.open(kit.url)
    reply = await client.call("auth", token=kit.token(org, sub, **claims))
    assert reply["ok"], reply
    return client


async def test_auth_result_has_every_field(tmp_path):
    async with running_server(tmp_path) as kit:
        client = await RawClient.open(kit.url)
        reply = await client.call("auth", token=kit.token("acme", "alice"))
        result = reply["result"]
        assert set(result) >= {"conn", "org", "sub", "exp", "session", "heartbeat", "resumed"}
        assert (result["org"], result["sub"], result["resumed"]) == ("acme", "alice", False)
        assert result["heartbeat"] == kit.settings.heartbeat.interval
        await client.close()


async def test_header_auth_sends_connected_push(tmp_path):
    async with running_server(tmp_path) as kit:
        token = kit.token("acme", "bob")
        client = await RawClient.open(
            kit.url,
            additional_headers={"Authorization": f"Bearer {token}"},
            subprotocols=["apix.v1"],
        )
        assert client.conn.subprotocol == "apix.v1"
        push = await client.next_push("connected")
        assert (push["org"], push["sub"]) == ("acme", "bob")
        assert (await client.call("ping"))["result"] == {}
        await client.close()


@pytest.mark.parametrize(
    ("path", "headers", "subprotocols", "status"),
    [
        ("/nope", {}, None, 404),
        ("/ws", {"Authorization": "Bearer not-a-jwt"}, None, 401),
        ("/ws", {}, ["other.v9"], 400),
    ],
)
async def test_handshake_rejections(tmp_path, path, headers, subprotocols, status):
    async with running_server(tmp_path) as kit:
        url = kit.url.replace("/ws", path)
        with pytest.raises(InvalidStatus) as info:
            await RawClient.open(url, additional_headers=headers, subprotocols=subprotocols)
        assert info.value.response.status_code == status


async def test_origin_allow_list(tmp_path):
    async with running_server(
        tmp_path, server={"allowed_origins": ("https://good.example",)}
    ) as kit:
        with pytest.raises(InvalidStatus) as info:
            await RawClient.open(kit.url, origin="https://evil.example")
        assert info.value.response.status_code == 403
        client = await RawClient.open(kit.url, origin="https://good.example")
        await client.close()


async def test_ops_before_auth_are_unauthenticated_then_auth_works(tmp_path):
    async with running_server(tmp_path) as kit:
        client = await RawClient.open(kit.url)
        reply = await client.call("subscribe", channel="chat.a")
        assert reply["error"]["code"] == "unauthenticated"
        reply = await client.call("auth", token=kit.token())
        assert reply["ok"]
        await client.close()


async def test_bad_token_gets_error_then_4001(tmp_path):
    async with running_server(tmp_path) as kit:
        client = await RawClient.open(kit.url)
        reply = await client.call("auth", token="eyJhbGciOiJub25lIn0.e30.")
        assert reply["error"]["code"] == "unauthenticated"
        code, _ = await client.wait_closed()
        assert code == 4001


async def test_publish_subscribe_flow_and_tenant_isolation(tmp_path):
    async with running_server(tmp_path) as kit:
        alice = await authed(kit, "acme", "alice")
        other_org = await authed(kit, "globex", "alice")
        reply = await alice.call("subscribe", channel="chat.room1")
        assert reply["result"] == {
            "channel": "chat.room1",
            "position": "0-0",
            "recovered": True,
            "replayed": 0,
        }
        await other_org.call("subscribe", channel="chat.room1")
        bob = await authed(kit, "acme", "bob")
        published = (await bob.call("publish", channel="chat.room1", data={"n": 1}))["result"]
        assert published["duplicate"] is False
        push = await alice.next_push()
        assert push["channel"] == "chat.room1"
        assert push["event"]["id"] == published["id"]
        assert push["event"]["data"] == {"n": 1}
        assert push["event"]["from"] == "bob"
        # The other org's channel of the same name saw nothing and has no history.
        history = (await other_org.call("history", channel="chat.room1"))["result"]
        assert history == {"events": [], "position": "0-0"}
        assert other_org.pushes == []
        for client in (alice, other_org, bob):
            await client.close()


async def test_idempotent_publish(tmp_path):
    async with running_server(tmp_path) as kit:
        client = await authed(kit)
        first = (await client.call("publish", channel="orders.1", data=1, key="k-1"))["result"]
        second = (await client.call("publish", channel="orders.1", data=2, key="k-1"))["result"]
        assert second == {**first, "duplicate": True}
        history = (await client.call("history", channel="orders.1"))["result"]
        assert [e["data"] for e in history["events"]] == [1]
        await client.close()


async def test_history_and_since_replay_then_live(tmp_path):
    async with running_server(tmp_path) as kit:
        pub = await authed(kit, sub="pub")
        ids = []
        for n in range(10):
            ids.append((await pub.call("publish", channel="feed.x", data=n))["result"]["id"])
        newest = (await pub.call("history", channel="feed.x", limit=3))["result"]
        assert [e["data"] for e in newest["events"]] == [7, 8, 9]
        assert newest["position"] == ids[-1]
        after = (await pub.call("history", channel="feed.x", since=ids[2], limit=4))["result"]
        assert [e["data"] for e in after["events"]] == [3, 4, 5, 6]

        sub = await authed(kit, sub="sub")
        reply = await sub.call("subscribe", channel="feed.x", since=ids[4])
        assert reply["result"]["recovered"] is True
        assert reply["result"]["replayed"] == 5
        replayed = [p["event"]["data"] for p in sub.pushes]
        assert replayed == [5, 6, 7, 8, 9]
        sub.pushes.clear()
        await pub.call("publish", channel="feed.x", data=10)
        assert (await sub.next_push())["event"]["data"] == 10
        for client in (pub, sub):
            await client.close()


async def test_since_after_trimming_is_not_recovered(tmp_path):
    async with running_server(tmp_path) as kit:  # namespace small.> keeps 5 events
        client = await authed(kit)
        first = (await client.call("publish", channel="small.a", data=0))["result"]["id"]
        for n in range(1, 20):
            await client.call("publish", channel="small.a", data=n)
        reply = (await client.call("subscribe", channel="small.a", since=first))["result"]
        assert reply["recovered"] is False
        assert reply["replayed"] >= 5
        data = [p["event"]["data"] for p in client.pushes]
        assert data == list(range(20 - len(data), 20))
        await client.close()


async def test_permissions_forbid(tmp_path):
    async with running_server(tmp_path) as kit:
        client = await authed(kit, sub="carol", pub=("user.{sub}",), subs=("news.*",))
        assert (await client.call("publish", channel="user.carol", data=1))["ok"]
        reply = await client.call("publish", channel="user.dave", data=1)
        assert reply["error"]["code"] == "forbidden"
        assert (await client.call("subscribe", channel="news.today"))["ok"]
        reply = await client.call("subscribe", channel="news.today.late")
        assert reply["error"]["code"] == "forbidden"
        reply = await client.call("history", channel="secret.x")
        assert reply["error"]["code"] == "forbidden"
        await client.close()


async def test_admin_role_grants_everything_in_own_org(tmp_path):
    async with running_server(tmp_path) as kit:
        admin = await authed(kit, "acme", "root", pub=(), subs=(), roles=("admin",))
        assert (await admin.call("publish", channel="any.thing", data=1))["ok"]
        assert (await admin.call("subscribe", channel="any.thing"))["ok"]
        await admin.close()


async def test_malformed_frames_get_null_id_and_connection_stays(tmp_path):
    async with running_server(tmp_path) as kit:
        client = await authed(kit)
        for frame in ("not json", "[1,2]", '{"op":"ping"}', '{"op":"ping","id":"7"}'):
            await client.send(frame)
            reply = await client.recv()
            assert reply["id"] is None and reply["error"]["code"] == "bad_request", reply
        reply = await client.call("nope")
        assert reply["error"]["code"] == "bad_request"
        reply = await client.call("subscribe", channel="bad..name")
        assert reply["error"]["code"] == "bad_request"
        assert (await client.call("ping"))["ok"]
        await client.close()


async def test_repeated_bad_frames_close_1008(tmp_path):
    async with running_server(tmp_path, limits={"bad_frames": 3}) as kit:
        client = await authed(kit)
        for _ in range(3):
            await client.send("garbage")
        code, _ = await client.wait_closed()
        assert code == 1008


async def test_binary_frame_closes_1003(tmp_path):
    async with running_server(tmp_path) as kit:
        client = await authed(kit)
        await client.send(b"\x00\x01")
        code, _ = await client.wait_closed()
        assert code == 1003


async def test_oversize_message_closes_1009(tmp_path):
    async with running_server(tmp_path, limits={"max_message_bytes": 1024}) as kit:
        client = await authed(kit)
        await client.send(orjson.dumps({"op": "ping", "id": 1, "pad": "x" * 2000}).decode())
        code, _ = await client.wait_closed()
        assert code == 1009


async def test_subscription_limit(tmp_path):
    async with running_server(tmp_path, limits={"max_subscriptions": 2}) as kit:
        client = await authed(kit)
        assert (await client.call("subscribe", channel="a.1"))["ok"]
        assert (await client.call("subscribe", channel="a.2"))["ok"]
        # Subscribing twice is a no-op, not a new subscription.
        assert (await client.call("subscribe", channel="a.2"))["ok"]
        reply = await client.call("subscribe", channel="a.3")
        assert reply["error"]["code"] == "limit_exceeded"
        assert (await client.call("unsubscribe", channel="a.1"))["result"] == {}
        assert (await client.call("subscribe", channel="a.3"))["ok"]
        await client.close()


async def test_refresh_same_identity_only(tmp_path):
    async with running_server(tmp_path) as kit:
        client = await authed(kit, "acme", "alice")
        reply = await client.call("refresh", token=kit.token("acme", "alice", ttl=7200))
        assert reply["ok"] and reply["result"]["exp"] > 0
        reply = await client.call("refresh", token=kit.token("acme", "mallory"))
        assert reply["error"]["code"] == "forbidden"
        reply = await client.call("refresh", token=kit.token("globex", "alice"))
        assert reply["error"]["code"] == "forbidden"
        await client.close()


async def test_refresh_drops_cached_permission_decisions(tmp_path):
    """Decisions are cached per connection; a refreshed token's narrower (or
    wider) perms apply to the very next op on the same channel."""
    async with running_server(tmp_path) as kit:
        client = await RawClient.open(kit.url)
        token = kit.token("acme", "alice", pub=("news.*",), subs=("news.*",))
        assert (await client.call("auth", token=token))["ok"]
        for _ in range(2):  # the second time from the cache
            assert (await client.call("publish", channel="news.a", data=1))["ok"]
            assert (await client.call("history", channel="news.a", limit=1))["ok"]
        narrower = kit.token("acme", "alice", pub=("other.*",), subs=("other.*",))
        assert (await client.call("refresh", token=narrower))["ok"]
        reply = await client.call("publish", channel="news.a", data=2)
        assert reply["error"]["code"] == "forbidden"
        reply = await client.call("history", channel="news.a", limit=1)
        assert reply["error"]["code"] == "forbidden"
        assert (await client.call("publish", channel="other.b", data=3))["ok"]
        wider = kit.token("acme", "alice", pub=("news.*", "other.*"), subs=("news.*",))
        assert (await client.call("refresh", token=wider))["ok"]
        assert (await client.call("publish", channel="news.a", data=4))["ok"]
        await client.close()


async def test_rate_limit_reply_carries_retry_after(tmp_path):
    async with running_server(tmp_path, limits={"ops_per_second": 1.0}) as kit:
        client = await authed(kit)
        codes = []
        for _ in range(4):
            reply = await client.call("ping")
            codes.append(reply["ok"] or reply["error"]["code"])
        assert codes[:2] == [True, True]
        assert "rate_limited" in codes
        limited = [r for r in codes if r == "rate_limited"]
        assert limited
        await client.close()


async def test_later_issue_ops_answer_bad_request_not_crash(tmp_path):
    async with running_server(tmp_path) as kit:
        client = await authed(kit)
        reply = await client.call("subscribe", channel="jobs.a", group="workers", since="0")
        assert reply["error"]["code"] == "bad_request"
        assert (await client.call("ping"))["ok"]
        await client.close()


async def test_sigterm_style_shutdown_closes_with_1001(tmp_path):
    async with running_server(tmp_path) as kit:
        client = await authed(kit)
        kit.running.shutdown()
        code, _ = await client.wait_closed()
        assert code == 1001
    # serve() returned: every connection is gone and accounted for.
    assert len(kit.hub.registry) == 0
    assert kit.hub.router.statistics().subscriptions == 0
