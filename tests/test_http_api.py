"""The HTTP server API (HTTP_API.md) over real sockets, on an in-process server
with the embedded broker: every route's success and documented errors,
org isolation, permissions, body limits, rate limit, CORS, request ids.

Multi-node behaviour (disconnect and connections across nodes, a killed
node) is in tests/test_http_nodes.py; the OpenAPI document and the docs
page in tests/test_http_docs.py; redrive in tests/test_http_redrive.py.
"""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from apix_trio.broker.model import BrokerUnavailable
from tests.httpkit import Reply, http_request
from tests.memws import MemClient
from tests.serverkit import Kit, running_server

ORG = "acme"
OTHER = "globex"


@pytest.fixture
async def kit(tmp_path: Path) -> AsyncIterator[Kit]:
    async with running_server(tmp_path, limits={"max_message_bytes": 1024}) as k:
        yield k


def admin(kit: Kit, org: str = ORG, sub: str = "ops") -> str:
    return kit.token(org, sub, roles=("admin",))


async def call(kit: Kit, method: str, path: str, **kw: Any) -> Reply:
    return await http_request(kit.running.http_port, method, path, **kw)


async def ws_client(kit: Kit, org: str = ORG, sub: str = "alice") -> tuple[MemClient, str]:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.connect(("127.0.0.1", kit.running.ws_port))
    client = MemClient(trio.SocketStream(sock))
    await client.handshake([])
    reply = await client.call("auth", token=kit.token(org, sub))
    assert reply["ok"], reply
    return client, str(reply["result"]["conn"])


def assert_error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.error
    assert error["code"] == code and isinstance(error["message"], str)
    assert b"Traceback" not in reply.body
    return error


# -- conventions -------------------------------------------------------------------


async def test_health_ready_metrics_and_common_headers(kit: Kit) -> None:
    health = await call(kit, "GET", "/api/v1/health")
    assert health.status == 200 and health.json() == {"status": "ok", "node": "test-node"}
    assert health.headers["x-content-type-options"] == "nosniff"
    assert health.headers["cache-control"] == "no-store"
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]+", health.headers["x-request-id"])
    ready = await call(kit, "GET", "/api/v1/ready")
    assert ready.status == 200 and ready.json()["ready"] is True
    metrics = await call(kit, "GET", "/metrics")
    assert metrics.status == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert b"apix_connections" in metrics.body


async def test_ready_is_503_with_a_reason_while_shutting_down(kit: Kit) -> None:
    kit.hub.accepting = False
    reply = await call(kit, "GET", "/api/v1/ready")
    assert reply.status == 503
    assert reply.json()["ready"] is False and reply.json()["reason"] == "shutting down"
    kit.hub.accepting = True


async def test_request_id_is_echoed_and_logged(kit: Kit, capsys: pytest.CaptureFixture) -> None:
    reply = await call(kit, "GET", "/api/v1/health", headers={"X-Request-Id": "req-42.a:b"})
    assert reply.headers["x-request-id"] == "req-42.a:b"
    bad = await call(kit, "GET", "/api/v1/health", headers={"X-Request-Id": "x" * 200})
    assert bad.headers["x-request-id"] != "x" * 200
    error = await call(kit, "GET", "/api/v1/nope", headers={"X-Request-Id": "req-43"})
    assert_error(error, 404, "not_found")
    assert error.headers["x-request-id"] == "req-43"
    logged = capsys.readouterr().err
    assert re.search(r'"event": ?"http_request".*"request_id": ?"req-42.a:b"', logged)


async def test_wrong_method_and_unknown_route_are_json(kit: Kit) -> None:
    assert_error(await call(kit, "DELETE", "/api/v1/health"), 405, "bad_request")
    assert_error(await call(kit, "GET", "/api/v2/health"), 404, "not_found")


async def test_authentication_errors(kit: Kit) -> None:
    path = "/api/v1/channels/chat.a/events"
    assert_error(await call(kit, "GET", path), 401, "unauthenticated")
    assert_error(await call(kit, "GET", path, token="not.a.jwt"), 401, "unauthenticated")
    expired = kit.token(ORG, "alice", ttl=-60)
    assert_error(await call(kit, "GET", path, token=expired), 401, "unauthenticated")
    basic = await call(kit, "GET", path, headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert_error(basic, 401, "unauthenticated")


# -- publish and history -------------------------------------------------------------


async def test_publish_then_history(kit: Kit) -> None:
    token = kit.token(ORG, "alice")
    path = "/api/v1/channels/chat.room%3A1/events"
    first = await call(kit, "POST", path, token=token, json={"data": {"n": 1}, "key": "k1"})
    assert first.status == 200, first.body
    result = first.json()
    assert set(result) == {"id", "ts", "duplicate"} and result["duplicate"] is False
    again = await call(kit, "POST", path, token=token, json={"data": {"n": 2}, "key": "k1"})
    assert again.json() == {**result, "duplicate": True}
    null = await call(kit, "POST", path, token=token, json={"data": None})
    assert null.status == 200
    history = await call(kit, "GET", path, token=token)
    body = history.json()
    assert [e["data"] for e in body["events"]] == [{"n": 1}, None]
    assert body["events"][0]["from"] == "alice" and body["events"][0]["key"] == "k1"
    assert body["position"] == null.json()["id"]
    page = await call(kit, "GET", f"{path}?since={result['id']}&limit=5", token=token)
    assert [e["id"] for e in page.json()["events"]] == [null.json()["id"]]
    newest = await call(kit, "GET", f"{path}?limit=1", token=token)
    assert [e["id"] for e in newest.json()["events"]] == [null.json()["id"]]
    assert (await call(kit, "GET", f"{path}?since=0", token=token)).json() == body


async def test_publish_errors(kit: Kit) -> None:
    token = kit.token(ORG, "alice", pub=("chat.>",))
    ok = "/api/v1/channels/chat.a/events"
    assert_error(await call(kit, "POST", "/api/v1/channels/news.a/events", token=token,
                            json={"data": 1}), 403, "forbidden")  # fmt: skip
    bad_name = "/api/v1/channels/chat..a/events"
    assert_error(await call(kit, "POST", bad_name, token=token, json={"data": 1}), 400,
                 "bad_request")  # fmt: skip
    assert_error(await call(kit, "POST", ok, token=token, json={}), 400, "bad_request")
    assert_error(await call(kit, "POST", ok, token=token, json=[1]), 400, "bad_request")
    assert_error(
        await call(kit, "POST", ok, token=token, body=b'{"data":',
                   headers={"content-type": "application/json"}),
        400, "bad_request",
    )  # fmt: skip
    long_key = {"data": 1, "key": "k" * 129}
    assert_error(await call(kit, "POST", ok, token=token, json=long_key), 400, "bad_request")
    assert_error(await call(kit, "POST", ok, token=token, json={"data": 1, "key": 5}), 400,
                 "bad_request")  # fmt: skip
    # a value over the protocol's message limit (limits.max_message_bytes = 1024 here)
    big = {"data": "x" * 2000}
    assert_error(await call(kit, "POST", ok, token=token, json=big), 413, "too_large")


async def test_history_errors(kit: Kit) -> None:
    token = kit.token(ORG, "alice", subs=("chat.>",))
    path = "/api/v1/channels/chat.a/events"
    assert_error(await call(kit, "GET", "/api/v1/channels/news.a/events", token=token), 403,
                 "forbidden")  # fmt: skip
    for query in ("?since=banana", "?limit=0", "?limit=1001", "?limit=x"):
        assert_error(await call(kit, "GET", path + query, token=token), 400, "bad_request")
    assert_error(await call(kit, "GET", "/api/v1/channels/a%20b/events", token=token), 400,
                 "bad_request")  # fmt: skip


async def test_publish_respects_client_publish_except_for_admins(tmp_path: Path) -> None:
    from apix_trio.settings import ChannelOptions, Namespace

    ns = (Namespace("announce.>", ChannelOptions(client_publish=False)),)
    async with running_server(tmp_path, namespaces=ns) as kit:
        path = "/api/v1/channels/announce.all/events"
        user = await call(kit, "POST", path, token=kit.token(ORG, "alice"), json={"data": 1})
        assert_error(user, 403, "forbidden")
        ops = await call(kit, "POST", path, token=admin(kit), json={"data": 1})
        assert ops.status == 200


async def test_orgs_are_isolated(kit: Kit) -> None:
    path = "/api/v1/channels/chat.a/events"
    ours = await call(kit, "POST", path, token=kit.token(ORG, "alice"), json={"data": "ours"})
    assert ours.status == 200
    theirs = await call(kit, "GET", path, token=kit.token(OTHER, "mallory"))
    assert theirs.json() == {"events": [], "position": "0-0"}
    # an org in the body or query is not an org: nothing reaches acme's channel
    sneaky = {"data": "x", "org": ORG}
    await call(kit, "POST", path + "?org=acme", token=kit.token(OTHER, "mallory"), json=sneaky)
    mine = await call(kit, "GET", path, token=kit.token(ORG, "alice"))
    assert [e["data"] for e in mine.json()["events"]] == ["ours"]
    listed = await call(kit, "GET", "/api/v1/channels", token=admin(kit, OTHER))
    assert [c["channel"] for c in listed.json()["channels"]] == ["chat.a"]  # its own chat.a
    assert listed.json()["channels"][0]["position"] != ours.json()["id"]


async def test_legacy_publish_route(kit: Kit) -> None:
    body = {"channel": "chat.a", "data": {"x": 1}}
    reply = await call(kit, "POST", "/api/v1/publish", token=admin(kit), json=body)
    assert reply.status == 200 and reply.json()["duplicate"] is False
    user = await call(kit, "POST", "/api/v1/publish", token=kit.token(ORG, "alice"), json=body)
    assert_error(user, 403, "forbidden")
    bad = {"channel": "a b", "data": 1}
    assert_error(await call(kit, "POST", "/api/v1/publish", token=admin(kit), json=bad), 400,
                 "bad_request")  # fmt: skip


# -- broadcast -------------------------------------------------------------------------


async def test_broadcast_results_in_request_order(kit: Kit) -> None:
    token = kit.token(ORG, "alice", pub=("chat.>",))
    body = {"channels": ["chat.b", "news.x", "chat.a"], "data": {"hi": 1}, "key": "b1"}
    reply = await call(kit, "POST", "/api/v1/broadcast", token=token, json=body)
    assert reply.status == 200
    results = reply.json()["results"]
    assert [r["channel"] for r in results] == body["channels"]
    assert results[1]["error"]["code"] == "forbidden" and "id" not in results[1]
    for entry in (results[0], results[2]):
        assert entry["duplicate"] is False and "error" not in entry
    history = await call(kit, "GET", "/api/v1/channels/chat.a/events", token=token)
    assert [e["data"] for e in history.json()["events"]] == [{"hi": 1}]
    again = await call(kit, "POST", "/api/v1/broadcast", token=token, json=body)
    assert again.json()["results"][0]["duplicate"] is True


async def test_broadcast_malformed_fails_whole(kit: Kit) -> None:
    token = kit.token(ORG, "alice")
    for body in (
        {"channels": ["chat.a", "bad name"], "data": 1},
        {"channels": [], "data": 1},
        {"channels": [f"c.{i}" for i in range(101)], "data": 1},
        {"channels": "chat.a", "data": 1},
        {"channels": ["chat.a"]},
    ):
        assert_error(await call(kit, "POST", "/api/v1/broadcast", token=token, json=body), 400,
                     "bad_request")  # fmt: skip
    nothing = await call(kit, "GET", "/api/v1/channels/chat.a/events", token=token)
    assert nothing.json()["events"] == []


# -- admin: channels, connections, disconnect ---------------------------------------------


async def test_admin_routes_need_the_admin_role(kit: Kit) -> None:
    user = kit.token(ORG, "alice")
    for method, path, body in (
        ("GET", "/api/v1/channels", None),
        ("GET", "/api/v1/connections", None),
        ("POST", "/api/v1/disconnect", {"sub": "bob"}),
        ("GET", "/api/v1/groups/chat.a/g", None),
        ("POST", "/api/v1/groups/chat.a/g/redrive", {}),
    ):
        kw: dict[str, Any] = {"token": user} if body is None else {"token": user, "json": body}
        assert_error(await call(kit, method, path, **kw), 403, "forbidden")
        assert_error(await call(kit, method, path), 401, "unauthenticated")


async def test_list_channels(kit: Kit) -> None:
    token = kit.token(ORG, "alice")
    for channel in ("chat.b", "chat.a", "news.x"):
        await call(kit, "POST", f"/api/v1/channels/{channel}/events", token=token,
                   json={"data": 1})  # fmt: skip
    client, _ = await ws_client(kit)
    assert (await client.call("subscribe", channel="live.only"))["ok"]
    reply = await call(kit, "GET", "/api/v1/channels", token=admin(kit))
    channels = reply.json()["channels"]
    assert [c["channel"] for c in channels] == ["chat.a", "chat.b", "live.only", "news.x"]
    assert [c["subscribers"] for c in channels] == [0, 0, 1, 0]
    assert channels[2]["position"] == "0-0"
    prefixed = await call(kit, "GET", "/api/v1/channels?prefix=chat.&limit=1", token=admin(kit))
    assert [c["channel"] for c in prefixed.json()["channels"]] == ["chat.a"]
    for query in ("?limit=0", "?limit=1001"):
        assert_error(await call(kit, "GET", "/api/v1/channels" + query, token=admin(kit)), 400,
                     "bad_request")  # fmt: skip
    await client.stream.aclose()


async def test_connections_and_disconnect_by_sub(kit: Kit) -> None:
    bob1, conn1 = await ws_client(kit, sub="bob")
    bob2, _ = await ws_client(kit, sub="bob")
    carol, carol_conn = await ws_client(kit, sub="carol")
    stranger, _ = await ws_client(kit, org=OTHER, sub="bob")
    listed = await call(kit, "GET", "/api/v1/connections", token=admin(kit))
    body = listed.json()
    assert body["total"] == 3
    assert {c["sub"] for c in body["connections"]} == {"bob", "carol"}
    for entry in body["connections"]:
        assert entry["node"] == "test-node" and isinstance(entry["since"], int)
    only_bob = await call(kit, "GET", "/api/v1/connections?sub=bob&limit=1", token=admin(kit))
    assert only_bob.json()["total"] == 2 and len(only_bob.json()["connections"]) == 1

    reply = await call(kit, "POST", "/api/v1/disconnect", token=admin(kit),
                       json={"sub": "bob", "reason": "bye"})  # fmt: skip
    assert reply.json() == {"disconnected": 2}
    with trio.fail_after(2):
        for client in (bob1, bob2):
            await client.until_closed()
            assert client.close_code == 4030
    # carol and the other org's bob stay connected
    assert (await carol.call("ping"))["ok"] and (await stranger.call("ping"))["ok"]
    by_conn = await call(kit, "POST", "/api/v1/disconnect", token=admin(kit),
                         json={"conn": carol_conn})  # fmt: skip
    assert by_conn.json() == {"disconnected": 1}
    with trio.fail_after(2):
        await carol.until_closed()
    assert carol.close_code == 4030
    gone = await call(kit, "POST", "/api/v1/disconnect", token=admin(kit), json={"conn": conn1})
    assert gone.json() == {"disconnected": 0}
    await stranger.stream.aclose()


async def test_disconnect_never_reaches_another_org(kit: Kit) -> None:
    victim, conn = await ws_client(kit, org=OTHER, sub="bob")
    for body in ({"conn": conn}, {"sub": "bob"}):
        reply = await call(kit, "POST", "/api/v1/disconnect", token=admin(kit), json=body)
        assert reply.json() == {"disconnected": 0}
    listed = await call(kit, "GET", "/api/v1/connections", token=admin(kit))
    assert listed.json() == {"connections": [], "total": 0}
    assert (await victim.call("ping"))["ok"]
    await victim.stream.aclose()


async def test_disconnect_body_errors(kit: Kit) -> None:
    for body in ({}, {"sub": "a", "conn": "b"}, {"sub": ""}, {"sub": 5}, {"conn": "x" * 65}):
        assert_error(await call(kit, "POST", "/api/v1/disconnect", token=admin(kit), json=body),
                     400, "bad_request")  # fmt: skip


# -- groups --------------------------------------------------------------------------------


async def test_group_state(kit: Kit) -> None:
    assert_error(await call(kit, "GET", "/api/v1/groups/chat.a/workers", token=admin(kit)), 404,
                 "not_found")  # fmt: skip
    assert_error(await call(kit, "GET", "/api/v1/groups/chat.a/bad%20group", token=admin(kit)),
                 400, "bad_request")  # fmt: skip
    worker, _ = await ws_client(kit, sub="worker")
    assert (await worker.call("subscribe", channel="jobs.a", group="workers"))["ok"]
    await call(kit, "POST", "/api/v1/channels/jobs.a/events", token=admin(kit), json={"data": 1})
    with trio.fail_after(5):
        while True:
            frame = await worker.recv()
            if frame is not None and frame.get("push") == "event":
                break
    reply = await call(kit, "GET", "/api/v1/groups/jobs.a/workers", token=admin(kit))
    body = reply.json()
    assert body["pending"] == 1 and body["dead_letters"] == 0
    [consumer] = [c for c in body["consumers"] if c["pending"]]
    assert consumer["name"].startswith("test-node:") and consumer["idle_ms"] >= 0
    other = await call(kit, "GET", "/api/v1/groups/jobs.a/workers", token=admin(kit, OTHER))
    assert_error(other, 404, "not_found")
    await worker.stream.aclose()


# -- limits, CORS, failures ----------------------------------------------------------------


async def test_body_limit(tmp_path: Path) -> None:
    async with running_server(tmp_path, api={"max_body_bytes": 64}) as kit:
        path = "/api/v1/channels/chat.a/events"
        token = kit.token(ORG, "alice")
        big = {"data": "x" * 100}
        assert_error(await call(kit, "POST", path, token=token, json=big), 413, "too_large")
        chunks = [b'{"data": "', b"x" * 40, b"x" * 40, b'"}']
        assert_error(await call(kit, "POST", path, token=token, chunks=chunks), 413, "too_large")
        fine = await call(kit, "POST", path, token=token, chunks=[b'{"data":', b"1}"])
        assert fine.status == 200
        history = await call(kit, "GET", path, token=token)
        assert [e["data"] for e in history.json()["events"]] == [1]


async def test_rate_limit_per_org(tmp_path: Path) -> None:
    async with running_server(tmp_path, api={"rate_per_org": 0.5}) as kit:
        path = "/api/v1/channels/chat.a/events"
        token = kit.token(ORG, "alice")
        assert (await call(kit, "GET", path, token=token)).status == 200  # burst 2 x 0.5 = 1
        limited = await call(kit, "GET", path, token=admin(kit))  # same org, other user
        error = assert_error(limited, 429, "rate_limited")
        assert limited.headers["retry-after"] == "2"
        assert 1.5 < error["retry_after"] <= 2.0
        assert (await call(kit, "GET", path, token=kit.token(OTHER, "x"))).status == 200
        assert (await call(kit, "GET", "/api/v1/health")).status == 200  # no org: not counted


async def test_cors(tmp_path: Path) -> None:
    app = "https://app.example.com"
    async with running_server(tmp_path, server={"allowed_origins": (app,)}) as kit:
        allowed = await call(kit, "GET", "/api/v1/health", headers={"Origin": app})
        assert allowed.headers["access-control-allow-origin"] == app
        assert "X-Request-Id" in allowed.headers["access-control-expose-headers"]
        other = await call(kit, "GET", "/api/v1/health", headers={"Origin": "https://evil.test"})
        assert other.status == 200 and "access-control-allow-origin" not in other.headers
        preflight_headers = {
            "Origin": app,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        preflight = await call(kit, "OPTIONS", "/api/v1/broadcast", headers=preflight_headers)
        assert preflight.status == 204
        assert preflight.headers["access-control-allow-origin"] == app
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "Authorization" in preflight.headers["access-control-allow-headers"]
        evil = {**preflight_headers, "Origin": "https://evil.test"}
        refused = await call(kit, "OPTIONS", "/api/v1/broadcast", headers=evil)
        assert_error(refused, 403, "forbidden")


async def test_cors_any_origin_when_list_is_empty(kit: Kit) -> None:
    reply = await call(kit, "GET", "/api/v1/health", headers={"Origin": "https://a.test"})
    assert reply.headers["access-control-allow-origin"] == "https://a.test"


async def test_backend_down_is_503_and_a_crash_is_500(
    kit: Kit, capsys: pytest.CaptureFixture
) -> None:
    async def down(*_args: Any, **_kw: Any) -> Any:
        raise BrokerUnavailable("redis did not answer")

    async def broken(*_args: Any, **_kw: Any) -> Any:
        raise RuntimeError("a bug")

    broker: Any = kit.hub.broker
    broker.publish = down
    reply = await call(kit, "POST", "/api/v1/channels/chat.a/events", token=admin(kit),
                       json={"data": 1})  # fmt: skip
    assert_error(reply, 503, "unavailable")
    broker.list_channels = broken
    crash = await call(kit, "GET", "/api/v1/channels", token=admin(kit))
    error = assert_error(crash, 500, "internal")
    assert "a bug" not in error["message"]
    assert (await call(kit, "GET", "/api/v1/health")).status == 200
    # logged (with its traceback) once the response is out, never sent
    assert '"http_failed"' in capsys.readouterr().err
