"""Every audit entry type, produced by a real action over a real WebSocket.

Most tests run the real server pieces (handshake, connection, op handlers,
group readers, audit writer) over in-memory streams on a MockClock
(`tests/memws.py`), so timers (auth timeout, token expiry, rate-limit
streaks, retries) fire at exact virtual times. One test runs a real server
on a TCP socket to check the `ip` field. Every test checks that each entry
appears once, with its fields, and that no token is anywhere in the trail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio.testing
from wsproto.events import CloseConnection

from apix_trio.auth.devkeys import ensure_dev_keys, mint_token
from apix_trio.broker.audit import AuditQuery
from apix_trio.gateway.hub import audit_retention
from apix_trio.gateway.reports import audit_page
from apix_trio.protocol.codes import CloseCode
from tests.memws import MemClient, MemHub, fake_wall, memory_hub
from tests.serverkit import running_server
from tests.test_slow_consumer import stalling_client
from tests.wsclient import RawClient

pytestmark = pytest.mark.timeout(60)

QUIET = {"heartbeat": {"interval": 1e6}}


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def trail(mem: MemHub, org: str = "acme", **query: Any) -> list[dict[str, Any]]:
    """Every entry of `org`'s trail, once the writer has stored what is queued."""
    await trio.testing.wait_all_tasks_blocked()
    await mem.hub.audit.flush()
    page = await mem.hub.broker.audit.page(
        org, AuditQuery(limit=1000, **query), audit_retention(mem.hub.settings)
    )
    return list(page.entries)


def assert_no_token(entries: list[dict[str, Any]], *tokens: str) -> None:
    text = orjson.dumps(entries).decode()
    assert "eyJ" not in text
    for token in tokens:
        assert token not in text


def types(entries: list[dict[str, Any]]) -> list[str]:
    return [entry["type"] for entry in entries]


def other_key_token(tmp_path: Path, **claims: Any) -> str:
    """A well-formed token signed by a key the server does not know."""
    private, _, _ = ensure_dev_keys(tmp_path / "other-keys")
    return mint_token(private, org="acme", sub="mallory", ttl=3600, now=fake_wall(), **claims)


async def authed(mem: MemHub, client: MemClient, **claims: Any) -> dict[str, Any]:
    token = mem.token(**claims)
    reply = await client.call("auth", token=token)
    assert reply["ok"], reply
    result: dict[str, Any] = reply["result"]
    return result


# -- authentication -------------------------------------------------------------------


async def test_auth_ok_names_the_connection(tmp_path, autojump_clock):
    async with memory_hub(tmp_path, **QUIET) as mem:
        client = await mem.connect()
        token = mem.token(sub="alice")
        result = (await client.call("auth", token=token))["result"]
        [entry] = await trail(mem)
        assert entry["type"] == "auth.ok"
        assert (entry["sub"], entry["conn"], entry["node"]) == (
            "alice",
            result["conn"],
            "test-node",
        )
        assert entry["detail"] == {"via": "auth", "exp": result["exp"]}
        assert entry["ts"] == int(fake_wall() * 1000)
        assert_no_token([entry], token)


async def test_a_bad_signature_goes_to_the_log_only(tmp_path, autojump_clock):
    async with memory_hub(tmp_path, **QUIET) as mem:
        client = await mem.connect()
        reply = await client.call("auth", token=other_key_token(tmp_path))
        assert reply["error"]["code"] == "unauthenticated"
        await client.until_closed()
        assert client.close_code == CloseCode.UNAUTHENTICATED
        assert await trail(mem) == []  # no trustworthy org: nothing in any trail
        assert mem.hub.audit.statistics().recorded == 0


async def test_an_expired_verified_token_is_filed_in_its_org_with_the_4001_close(
    tmp_path, autojump_clock
):
    async with memory_hub(tmp_path, **QUIET) as mem:
        client = await mem.connect()
        expired = mint_token(
            mem.key_path, org="acme", sub="alice", ttl=60, now=fake_wall() - 3600, pub=(">",)
        )
        reply = await client.call("auth", token=expired)
        assert reply["error"]["code"] == "unauthenticated"
        await client.until_closed()
        failed, closed = await trail(mem)
        assert failed["type"] == "auth.failed"
        assert failed["sub"] == "alice" and failed["conn"]
        assert failed["detail"] == {"reason": "expired", "via": "auth"}
        assert closed["type"] == "connection.closed" and closed["conn"] == failed["conn"]
        assert closed["detail"] == {"code": 4001, "reason": "unauthenticated"}
        assert await trail(mem, "globex") == []
        assert_no_token([failed, closed], expired)


async def test_header_auth_ok_and_refused(tmp_path, autojump_clock):
    async with memory_hub(tmp_path, **QUIET) as mem:
        token = mem.token(sub="hdr")
        await mem.connect(headers=[(b"authorization", f"Bearer {token}".encode())])
        expired = mint_token(mem.key_path, org="acme", sub="late", ttl=1, now=fake_wall() - 99)
        with pytest.raises(AssertionError, match="handshake failed"):
            await mem.connect(headers=[(b"authorization", f"Bearer {expired}".encode())])
        with pytest.raises(AssertionError, match="handshake failed"):
            bad = other_key_token(tmp_path)
            await mem.connect(headers=[(b"authorization", f"Bearer {bad}".encode())])
        ok, failed = await trail(mem)
        assert (ok["type"], ok["sub"], ok["detail"]["via"]) == ("auth.ok", "hdr", "header")
        assert failed["type"] == "auth.failed" and failed["sub"] == "late"
        assert failed["detail"] == {"reason": "expired", "via": "header"}
        assert_no_token([ok, failed], token, expired)


# -- closes by the server ----------------------------------------------------------------


async def test_auth_timeout_4001_without_any_token_is_log_only(tmp_path, autojump_clock):
    async with memory_hub(tmp_path, auth={"timeout": 5.0}, **QUIET) as mem:
        client = await mem.connect()
        await client.until_closed()
        assert client.close_code == 4001
        assert mem.hub.audit.statistics().recorded == 0


async def test_token_expiry_closes_4003_once(tmp_path, autojump_clock):
    async with memory_hub(tmp_path, auth={"leeway": 5.0, "expiry_warning": 30.0}, **QUIET) as mem:
        client = await mem.connect()
        result = await authed(mem, client, ttl=100)
        start = trio.current_time()
        await client.until_closed()
        assert client.close_code == 4003
        assert trio.current_time() == pytest.approx(start + 105, abs=1)
        ok, closed = await trail(mem)
        assert ok["type"] == "auth.ok"
        assert closed["type"] == "connection.closed" and closed["conn"] == result["conn"]
        assert closed["detail"] == {"code": 4003, "reason": "token expired"}
        assert closed["ts"] == int(fake_wall() * 1000)


async def test_bad_frames_close_1008_after_auth_only_in_the_trail(tmp_path, autojump_clock):
    async with memory_hub(tmp_path, limits={"bad_frames": 3}, **QUIET) as mem:
        early = await mem.connect()  # before auth: no org, log only
        for _ in range(3):
            await early.send("{not json")
        await early.until_closed()
        assert early.close_code == 1008
        assert await trail(mem) == []

        client = await mem.connect()
        result = await authed(mem, client)
        for _ in range(3):
            await client.send("{not json")
        await client.until_closed()
        assert client.close_code == 1008
        entries = await trail(mem, type="connection.closed")
        assert [(e["conn"], e["detail"]["code"]) for e in entries] == [(result["conn"], 1008)]


async def test_admin_disconnect_4030_and_client_closes_are_not_audited(tmp_path, autojump_clock):
    async with memory_hub(tmp_path, **QUIET) as mem:
        client = await mem.connect()
        result = await authed(mem, client)
        conn = mem.hub.registry.get(result["conn"])
        assert conn is not None
        conn.request_close(CloseCode.ADMIN_DISCONNECT)
        await client.until_closed()
        assert client.close_code == 4030

        polite = await mem.connect()
        await authed(mem, polite, sub="bob")
        # the client closes with a code that would be audited from the server
        await polite.stream.send_all(polite.ws.send(CloseConnection(code=1008, reason="bye")))
        while await polite.stream.receive_some(65536):
            pass  # the server answers the close and hangs up
        closed = await trail(mem, type="connection.closed")
        assert [(e["sub"], e["detail"]) for e in closed] == [
            ("alice", {"code": 4030, "reason": "disconnected by an administrator"})
        ]


async def test_slow_consumer_4009(tmp_path, autojump_clock):
    async with memory_hub(
        tmp_path, limits={"outbox_size": 4, "ops_per_second": 1e6}, **QUIET
    ) as mem:
        slow, done, _ = await stalling_client(mem.hub, mem.nursery)
        result = await authed(mem, slow, sub="slowpoke")
        assert (await slow.call("subscribe", channel="feed.x"))["ok"]
        pub = await mem.connect()
        await authed(mem, pub, sub="pub")
        for n in range(8):
            assert (await pub.call("publish", channel="feed.x", data={"n": n}))["ok"]
        await done.wait()
        [closed] = await trail(mem, type="connection.closed")
        assert (closed["sub"], closed["conn"]) == ("slowpoke", result["conn"])
        assert closed["detail"] == {"code": 4009, "reason": "slow consumer"}


# -- rate limits ------------------------------------------------------------------------


async def test_rate_limited_once_per_streak_then_4029(tmp_path, autojump_clock):
    async with memory_hub(tmp_path, limits={"ops_per_second": 1.0}, **QUIET) as mem:
        client = await mem.connect()
        result = await authed(mem, client)
        # a first streak: 5 refusals in a burst, then a quiet 2 s
        for n in range(8):
            await client.send({"op": "ping", "id": n})
        for _ in range(8):
            assert await client.recv() is not None
        await trio.sleep(2.0)
        [first] = await trail(mem, type="rate.limited")
        assert (first["sub"], first["conn"], first["detail"]) == (
            "alice",
            result["conn"],
            {"op": "ping"},
        )
        # a second streak that lasts 10 s: one more entry, then the 4029 close
        n = 100
        while client.close_code is None:
            n += 1
            await client.send({"op": "ping", "id": n})
            await client.recv()
            await trio.sleep(0.05)
        assert client.close_code == 4029
        entries = await trail(mem)
        assert types(entries) == [
            "auth.ok", "rate.limited", "rate.limited", "connection.closed"
        ]  # fmt: skip
        assert entries[-1]["detail"] == {"code": 4029, "reason": "rate limit abuse"}


# -- permissions ---------------------------------------------------------------------


async def test_permission_denied_names_op_and_channel(tmp_path, autojump_clock):
    async with memory_hub(tmp_path, **QUIET) as mem:
        client = await mem.connect()
        token = mem.token(pub=("chat.>",), sub_patterns=("chat.>",))
        assert (await client.call("auth", token=token))["ok"]
        for op, fields in (
            ("publish", {"channel": "secret.plans", "data": 1}),
            ("subscribe", {"channel": "secret.feed"}),
            ("history", {"channel": "secret.log"}),
        ):
            reply = await client.call(op, **fields)
            assert reply["error"]["code"] == "forbidden", reply
        assert (await client.call("publish", channel="chat.ok", data=1))["ok"]
        denied = await trail(mem, type="permission.denied")
        assert [(e["sub"], e["detail"]) for e in denied] == [
            ("alice", {"op": "publish", "channel": "secret.plans"}),
            ("alice", {"op": "subscribe", "channel": "secret.feed"}),
            ("alice", {"op": "history", "channel": "secret.log"}),
        ]
        assert_no_token(denied, token)


# -- consumer groups -----------------------------------------------------------------


async def test_dead_letter(tmp_path, autojump_clock):
    delivery = {"retry_base": 1.0, "retry_max": 1.0, "max_attempts": 2}
    async with memory_hub(tmp_path, delivery=delivery, **QUIET) as mem:
        client = await mem.connect()
        await authed(mem, client, ttl=10**6)
        assert (await client.call("subscribe", channel="jobs", group="w"))["ok"]
        publisher = await mem.connect()
        await authed(mem, publisher, sub="boss", ttl=10**6)
        reply = await publisher.call("publish", channel="jobs", data={"job": 1})
        event_id = reply["result"]["id"]
        for _ in range(2):  # two deliveries, never acked
            push = await client.recv()
            assert push is not None and push["push"] == "event"
        await trio.sleep(5)
        [letter] = await trail(mem, type="group.dead_letter")
        assert letter["detail"] == {"channel": "jobs", "group": "w", "id": event_id, "attempts": 2}
        assert letter["node"] == "test-node"


# -- the query function and a real socket -------------------------------------------------


async def test_audit_page_function_and_peer_ip_over_tcp(tmp_path):
    async with running_server(tmp_path) as kit:
        token = kit.token(sub="tcp-user")
        client = await RawClient.open(kit.url)
        try:
            reply = await client.call("auth", token=token)
            assert reply["ok"]
            await trio.testing.wait_all_tasks_blocked()
            await kit.hub.audit.flush()
            body = await audit_page(kit.hub, "acme")
            [entry] = body["entries"]
            assert entry["ip"] == "127.0.0.1" and entry["sub"] == "tcp-user"
            assert body["position"] == entry["id"]
            assert (await audit_page(kit.hub, "acme", since=entry["id"]))["entries"] == []
            filtered = await audit_page(kit.hub, "acme", type="auth.failed", limit="10")
            assert filtered["entries"] == []
        finally:
            await client.close()
