"""The HTTP routes over presence, state, the audit trail and latency (HTTP_API.md),
and readiness from the delivery canary: real sockets, an in-process server on
the embedded broker. Each route's success, its documented errors, org
isolation, and the audit entries the changes leave."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from apix_trio.settings import ChannelOptions, Namespace
from tests.httpkit import Reply, http_request
from tests.memws import MemClient
from tests.serverkit import Kit, running_server

ORG = "acme"
OTHER = "globex"
NAMESPACES = (Namespace("room.>", ChannelOptions(presence=True)),)


@pytest.fixture
async def kit(tmp_path: Path) -> AsyncIterator[Kit]:
    async with running_server(tmp_path, namespaces=NAMESPACES) as k:
        yield k


async def call(kit: Kit, method: str, path: str, **kw: Any) -> Reply:
    return await http_request(kit.running.http_port, method, path, **kw)


async def ws_client(kit: Kit) -> MemClient:
    """A WebSocket client after the handshake, not yet authenticated."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.connect(("127.0.0.1", kit.running.ws_port))
    client = MemClient(trio.SocketStream(sock))
    await client.handshake([])
    return client


def admin(kit: Kit, org: str = ORG) -> str:
    return kit.token(org, "ops", roles=("admin",))


def assert_error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.error["code"] == code
    return reply.error


async def audit_entries(kit: Kit, type_: str, org: str = ORG) -> list[dict[str, Any]]:
    """The org's trail entries of one type, once the writer stored them."""
    with trio.fail_after(10):
        while True:
            path = f"/api/v1/audit?since=0&type={type_}"
            reply = await call(kit, "GET", path, token=admin(kit, org))
            assert reply.status == 200, reply.body
            entries: list[dict[str, Any]] = reply.json()["entries"]
            if entries:
                return entries
            await kit.hub.audit.flush()


async def test_state_routes_change_read_and_conflict(kit: Kit) -> None:
    token = kit.token(ORG, "alice", state=("doc.>",))
    assert (await call(kit, "GET", "/api/v1/state/doc.1", token=token)).json() == {
        "value": None,
        "version": 0,
    }
    put = await call(kit, "PUT", "/api/v1/state/doc.1", token=token, json={"value": {"a": 1}})
    assert put.status == 200 and put.json() == {"version": 1}
    patch = await call(
        kit, "PATCH", "/api/v1/state/doc.1", token=token, json={"patch": {"b": 2}, "version": 1}
    )
    assert patch.json() == {"version": 2}
    got = await call(kit, "GET", "/api/v1/state/doc.1", token=token)
    assert got.json() == {"value": {"a": 1, "b": 2}, "version": 2}
    stale = await call(
        kit, "PUT", "/api/v1/state/doc.1", token=token, json={"value": 0, "version": 1}
    )
    assert assert_error(stale, 409, "conflict")["version"] == 2
    deleted = await call(kit, "DELETE", "/api/v1/state/doc.1?version=2", token=token)
    assert deleted.json() == {"version": 3}
    assert (await call(kit, "GET", "/api/v1/state/doc.1", token=token)).json() == {
        "value": None,
        "version": 3,
    }
    # The same key in another org is unrelated.
    theirs = kit.token(OTHER, "alice", state=("doc.>",))
    assert (await call(kit, "GET", "/api/v1/state/doc.1", token=theirs)).json()["version"] == 0
    entries = await audit_entries(kit, "state.changed")
    assert [(e["detail"]["op"], e["detail"]["version"]) for e in entries] == [
        ("put", 1),
        ("patch", 2),
        ("delete", 3),
    ]
    assert all(e["sub"] == "alice" and e["detail"]["key"] == "doc.1" for e in entries)


async def test_state_route_errors(kit: Kit) -> None:
    token = kit.token(ORG, "alice", state=("doc.>",))
    assert_error(await call(kit, "GET", "/api/v1/state/other.1", token=token), 403, "forbidden")
    assert_error(await call(kit, "GET", "/api/v1/state/bad..key", token=token), 400, "bad_request")
    assert_error(await call(kit, "GET", "/api/v1/state/doc.1"), 401, "unauthenticated")
    assert_error(
        await call(kit, "PUT", "/api/v1/state/doc.1", token=token, json={"nope": 1}),
        400,
        "bad_request",
    )
    big = {"value": "x" * 70_000}
    too_big = await call(kit, "PUT", "/api/v1/state/doc.1", token=token, json=big)
    assert_error(too_big, 413, "too_large")


async def test_presence_route(kit: Kit) -> None:
    client = await ws_client(kit)
    token = kit.token(ORG, "alice", extra_claims={"info": {"name": "Alice"}})
    reply = await client.call("auth", token=token)
    assert reply["ok"], reply
    joined = await client.call("subscribe", channel="room.1", presence=True)
    assert joined["ok"], joined
    token = kit.token(ORG, "bob")
    got = await call(kit, "GET", "/api/v1/channels/room.1/presence", token=token)
    assert got.status == 200, got.body
    body = got.json()
    assert body["total"] == 1 and body["users"] == 1
    assert [(m["sub"], m["info"]) for m in body["members"]] == [("alice", {"name": "Alice"})]
    other = await call(kit, "GET", "/api/v1/channels/room.1/presence", token=kit.token(OTHER))
    assert other.json()["total"] == 0
    no_presence = await call(kit, "GET", "/api/v1/channels/chat.1/presence", token=token)
    assert_error(no_presence, 403, "forbidden")
    denied = kit.token(ORG, "eve", subs=("x.>",))
    assert_error(
        await call(kit, "GET", "/api/v1/channels/room.1/presence", token=denied), 403, "forbidden"
    )


async def test_audit_and_latency_routes_are_admin_only_and_org_scoped(kit: Kit) -> None:
    client = await ws_client(kit)
    assert (await client.call("auth", token=kit.token(ORG, "alice")))["ok"]
    for n in range(3):
        published = await client.call("publish", channel="chat.1", data={"n": n})
        assert published["ok"], published
    entries = await audit_entries(kit, "auth.ok")
    assert entries[0]["sub"] == "alice" and "token" not in str(entries[0])
    assert_error(
        await call(kit, "GET", "/api/v1/audit", token=kit.token(ORG, "alice")), 403, "forbidden"
    )
    theirs = await call(kit, "GET", "/api/v1/audit?since=0", token=admin(kit, OTHER))
    assert theirs.json()["entries"] == []
    zero = await call(kit, "GET", "/api/v1/audit?limit=0", token=admin(kit))
    assert_error(zero, 400, "bad_request")
    latency = await call(kit, "GET", "/api/v1/latency?window=60", token=admin(kit))
    assert latency.status == 200, latency.body
    report = latency.json()
    assert set(report) == {"publish_to_deliver_ms", "publish_ack_ms"}
    assert report["publish_ack_ms"]["count"] == 3
    assert set(report["publish_ack_ms"]) == {"p50", "p95", "p99", "max", "count"}
    bad_window = await call(kit, "GET", "/api/v1/latency?window=7", token=admin(kit))
    assert_error(bad_window, 400, "bad_request")


async def test_admin_disconnect_is_in_the_audit_trail(kit: Kit) -> None:
    client = await ws_client(kit)
    assert (await client.call("auth", token=kit.token(ORG, "alice")))["ok"]
    reply = await call(kit, "POST", "/api/v1/disconnect", token=admin(kit), json={"sub": "alice"})
    assert reply.json() == {"disconnected": 1}
    entries = await audit_entries(kit, "admin.disconnect")
    assert entries[0]["sub"] == "ops" and entries[0]["ip"] == "127.0.0.1"
    assert entries[0]["detail"]["sub"] == "alice"


async def test_ready_reports_the_canary(kit: Kit) -> None:
    ready = await call(kit, "GET", "/api/v1/ready")
    assert ready.status == 200
    assert ready.json() == {"ready": True, "node": "test-node", "reason": ""}
    kit.hub.accepting = False
    down = await call(kit, "GET", "/api/v1/ready")
    assert down.status == 503 and down.json()["ready"] is False and down.json()["reason"]
