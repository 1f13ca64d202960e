"""State ops end to end through real WebSockets, in process, on both brokers.

Servers run inside the test's trio run (`tests.serverkit.running_server`,
real sockets) on the embedded broker or a real redis-server; clients are
wsproto clients over TCP (`tests.test_resume.Peer`). Rate limiting is pinned
on a MockClock with an in-memory hub (`tests.memws.memory_hub`).

What is checked here beyond the broker contract (tests/test_state_contract.py):
the wire forms of replies, errors and pushes; permissions (`perms.state`,
`admin`); the errors of the limits; subscriptions counted against
`limits.max_subscriptions`; the subscribe seam under concurrent changes
(nothing lost, nothing doubled); rate limiting of changes; a resume
restoring state subscriptions with their current values; 4009 for a
subscriber that stops reading; the metrics.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from apix_trio.gateway import handshake as gateway
from tests.checks import sample
from tests.memws import memory_hub
from tests.serverkit import running_server
from tests.test_resume import Peer, open_peer
from tests.test_slow_consumer import socket_client, wait_eof

pytestmark = pytest.mark.timeout(90)

STEP = 30.0


def backend_settings(request: pytest.FixtureRequest, backend: str) -> dict[str, Any]:
    if backend == "memory":
        return {}
    return {"redis_url": request.getfixturevalue("redis_url")}


def state_pushes(peer: Peer, key: str | None = None) -> list[dict[str, Any]]:
    """Take the `state` pushes seen so far (of `key`, or all)."""
    taken = [
        p for p in peer.pushes if p.get("push") == "state" and (key is None or p["key"] == key)
    ]
    peer.pushes = [p for p in peer.pushes if p not in taken]
    return taken


async def wait_state(peer: Peer, count: int, key: str | None = None) -> list[dict[str, Any]]:
    """Read until `count` state pushes (of `key`) were seen; take them."""

    def seen() -> int:
        return sum(
            1 for p in peer.pushes if p.get("push") == "state" and (key is None or p["key"] == key)
        )

    while seen() < count:
        frame = await peer.client.recv()
        assert frame is not None, f"closed with {peer.client.close_code}"
        if "push" in frame:
            peer.pushes.append(frame)
    return state_pushes(peer, key)


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply["ok"] is True, reply
    result: dict[str, Any] = reply["result"]
    return result


def error(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply["ok"] is False, reply
    failure: dict[str, Any] = reply["error"]
    return failure


# -- the ops -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_get_set_patch_delete_and_the_pushes(tmp_path, request, backend):
    broker = backend_settings(request, backend)
    async with running_server(tmp_path, broker=broker) as kit:
        with trio.fail_after(STEP):
            alice, _ = await open_peer(kit, sub="alice")
            bob, _ = await open_peer(kit, sub="bob")
            assert ok(await alice.call("state.subscribe", key="doc.1")) == {
                "value": None,
                "version": 0,
            }
            assert ok(await bob.call("state.get", key="doc.1")) == {"value": None, "version": 0}
            value = {"title": "a", "tags": ["x"]}
            assert ok(await bob.call("state.set", key="doc.1", value=value)) == {"version": 1}
            patch = {"tags": None, "body": "b"}
            assert ok(await bob.call("state.patch", key="doc.1", patch=patch)) == {"version": 2}
            conflict = error(await bob.call("state.set", key="doc.1", value=0, version=1))
            assert (conflict["code"], conflict["version"]) == ("conflict", 2)
            conflict = error(await bob.call("state.delete", key="doc.1", version=0))
            assert (conflict["code"], conflict["version"]) == ("conflict", 2)
            assert ok(await bob.call("state.get", key="doc.1")) == {
                "value": {"title": "a", "body": "b"},
                "version": 2,
            }
            assert ok(await bob.call("state.delete", key="doc.1", version=2)) == {"version": 3}
            assert ok(await bob.call("state.get", key="doc.1")) == {"value": None, "version": 3}

            assert await wait_state(alice, 3) == [
                {"push": "state", "key": "doc.1", "version": 1, "value": value},
                {"push": "state", "key": "doc.1", "version": 2, "patch": patch},
                {"push": "state", "key": "doc.1", "version": 3, "value": None},
            ]
            # Unsubscribed: a later change of doc.1 is not pushed. doc.2's
            # change is made after it (same org: one bus shard, one order),
            # so once doc.2's push is here, doc.1's would have been too.
            assert ok(await alice.call("state.unsubscribe", key="doc.1")) == {}
            assert ok(await alice.call("state.unsubscribe", key="doc.1")) == {}  # idempotent
            assert ok(await alice.call("state.subscribe", key="doc.2"))["version"] == 0
            ok(await bob.call("state.set", key="doc.1", value="unseen"))
            ok(await bob.call("state.set", key="doc.2", value="seen"))
            assert [p["key"] for p in await wait_state(alice, 1)] == ["doc.2"]
            assert state_pushes(alice) == []
            await alice.hang_up()
            await bob.hang_up()


async def test_subscribing_twice_is_one_subscription_answering_the_current_value(tmp_path):
    async with running_server(tmp_path) as kit:
        with trio.fail_after(STEP):
            alice, _ = await open_peer(kit)
            ok(await alice.call("state.subscribe", key="doc.t"))
            ok(await alice.call("state.set", key="doc.t", value=1))
            assert ok(await alice.call("state.subscribe", key="doc.t")) == {
                "value": 1,
                "version": 1,
            }
            ok(await alice.call("state.set", key="doc.t", value=2))
            assert [p["version"] for p in await wait_state(alice, 2)] == [1, 2]
            assert sample(kit.hub.metrics, "apix_state_subscribers") == 1
            await alice.hang_up()


async def test_every_state_op_needs_perms_state_or_admin(tmp_path):
    async with running_server(tmp_path) as kit:
        with trio.fail_after(STEP):
            limited, _ = await open_peer(kit, sub="carol", state=("cfg.*",))
            ops: list[tuple[str, dict[str, Any]]] = [
                ("state.get", {}),
                ("state.set", {"value": 1}),
                ("state.patch", {"patch": {"a": 1}}),
                ("state.delete", {}),
                ("state.subscribe", {}),
                ("state.unsubscribe", {}),
            ]
            for op, fields in ops:
                assert error(await limited.call(op, key="doc.1", **fields))["code"] == "forbidden"
                assert ok(await limited.call(op, key="cfg.team", **fields)) is not None
            nothing, _ = await open_peer(kit, sub="dave", state=())
            assert error(await nothing.call("state.get", key="cfg.team"))["code"] == "forbidden"
            admin, _ = await open_peer(kit, sub="root", state=(), roles=("admin",))
            assert ok(await admin.call("state.set", key="doc.1", value="x")) == {"version": 1}
            # Nothing the forbidden calls tried was made.
            assert ok(await admin.call("state.get", key="doc.1")) == {"value": "x", "version": 1}
            for peer in (limited, nothing, admin):
                await peer.hang_up()


async def test_limits_answer_too_large_and_limit_exceeded(tmp_path):
    async with running_server(
        tmp_path, state={"max_value_bytes": 64, "max_keys_per_org": 2}
    ) as kit:
        with trio.fail_after(STEP):
            alice, _ = await open_peer(kit)
            too_big = error(await alice.call("state.set", key="k.1", value="x" * 63))
            assert too_big["code"] == "too_large"
            ok(await alice.call("state.set", key="k.1", value={"a": "x" * 50}))
            assert (
                error(await alice.call("state.patch", key="k.1", patch={"b": "y" * 10}))["code"]
                == "too_large"
            )
            ok(await alice.call("state.set", key="k.2", value=2))
            assert error(await alice.call("state.set", key="k.3", value=3))["code"] == (
                "limit_exceeded"
            )
            ok(await alice.call("state.delete", key="k.2"))
            assert ok(await alice.call("state.set", key="k.3", value=3)) == {"version": 1}
            # Another org has its own count.
            other, _ = await open_peer(kit, org="globex")
            ok(await other.call("state.set", key="k.1", value=1))
            ok(await other.call("state.set", key="k.2", value=2))
            bad = error(await alice.call("state.get", key="no spaces"))
            assert bad["code"] == "bad_request"
            await alice.hang_up()
            await other.hang_up()


async def test_state_subscriptions_count_against_max_subscriptions(tmp_path):
    async with running_server(tmp_path, limits={"max_subscriptions": 3}) as kit:
        with trio.fail_after(STEP):
            alice, _ = await open_peer(kit)
            ok(await alice.call("subscribe", channel="chat.a"))
            ok(await alice.call("state.subscribe", key="doc.a"))
            ok(await alice.call("state.subscribe", key="doc.b"))
            full = error(await alice.call("state.subscribe", key="doc.c"))
            assert full["code"] == "limit_exceeded"
            assert error(await alice.call("subscribe", channel="chat.b"))["code"] == (
                "limit_exceeded"
            )
            ok(await alice.call("state.subscribe", key="doc.a"))  # already there: fine
            ok(await alice.call("state.unsubscribe", key="doc.b"))
            ok(await alice.call("subscribe", channel="chat.b"))
            await alice.hang_up()


async def test_changes_count_against_ops_per_second(tmp_path, autojump_clock):
    async with memory_hub(tmp_path, limits={"ops_per_second": 2}) as mem:
        client = await mem.connect()
        reply = await client.call("auth", token=mem.token(state=(">",)))
        assert reply["ok"], reply
        start = trio.current_time()
        # Burst 2 x rate = 4 tokens: four changes pass, the fifth waits.
        for n, op in enumerate(["state.set", "state.patch", "state.delete", "state.set"]):
            fields = {"patch": {"n": n}} if op == "state.patch" else {"value": n}
            if op == "state.delete":
                fields = {}
            assert (await client.call(op, key="doc.r", **fields))["ok"]
        refused = await client.call("state.patch", key="doc.r", patch={"x": 1})
        assert refused["error"]["code"] == "rate_limited"
        assert refused["error"]["retry_after"] == 0.5
        await trio.sleep(0.5)
        assert (await client.call("state.patch", key="doc.r", patch={"x": 1}))["result"] == {
            "version": 5
        }
        assert trio.current_time() == start + 0.5
        assert sample(mem.hub.metrics, "apix_rate_limited_total") == 1
        assert sample(mem.hub.metrics, "apix_state_changes_total") == 5


# -- the seam ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_changes_racing_a_subscribe_are_neither_lost_nor_doubled(tmp_path, request, backend):
    """A writer makes CHANGES changes (WINDOW in flight) while readers keep
    subscribing: each reader gets exactly the versions after its reply's."""
    changes, window, readers = 600, 8, 6
    broker = backend_settings(request, backend)
    async with running_server(tmp_path, broker=broker, limits={"ops_per_second": 1e6}) as kit:
        with trio.fail_after(60):
            writer, _ = await open_peer(kit, sub="writer")
            peers = [(await open_peer(kit, sub=f"r{n}"))[0] for n in range(readers)]
            started: list[int] = []
            windows = changes // window
            # Reader n subscribes once window `go_at[n]` is answered, while
            # the writer goes on with the next ones.
            go_at = [windows * (n + 1) // (readers + 1) for n in range(readers)]
            go = [trio.Event() for _ in range(readers)]

            async def write_all() -> None:
                for w in range(windows):
                    for n in range(w * window, (w + 1) * window):
                        await writer.client.send(
                            {
                                "op": "state.patch",
                                "id": 1000 + n,
                                "key": "doc.hot",
                                "patch": {"n": n},
                            }
                        )
                    for _ in range(window):
                        reply = await writer.client.recv()
                        assert reply is not None and reply["ok"], reply
                    for n, at in enumerate(go_at):
                        if at == w:
                            go[n].set()

            async def subscribe_midway(peer: Peer, n: int) -> None:
                await go[n].wait()
                result = ok(await peer.call("state.subscribe", key="doc.hot"))
                started.append(result["version"])
                assert result["value"]["n"] == result["version"] - 1
                pushes = await wait_state(peer, changes - result["version"])
                assert [p["version"] for p in pushes] == list(
                    range(result["version"] + 1, changes + 1)
                )
                assert [p["patch"]["n"] for p in pushes] == list(range(result["version"], changes))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_all)
                for n, peer in enumerate(peers):
                    nursery.start_soon(subscribe_midway, peer, n)
            # The race was real: some readers came in while the changes ran.
            assert any(0 < version < changes for version in started), started
            for peer in (writer, *peers):
                await peer.hang_up()


async def test_a_subscriber_that_stops_reading_gets_4009(tmp_path, monkeypatch):
    monkeypatch.setattr(gateway, "SEND_TIMEOUT", 120.0)
    async with running_server(tmp_path, limits={"outbox_size": 32, "ops_per_second": 1e6}) as kit:
        with trio.fail_after(40):
            slow = await socket_client(kit, rcvbuf=4096)
            assert (await slow.call("auth", token=kit.token()))["ok"]
            assert (await slow.call("state.subscribe", key="doc.big"))["ok"]
            good, _ = await open_peer(kit, sub="good")
            ok(await good.call("state.subscribe", key="doc.big"))
            writer, _ = await open_peer(kit, sub="writer")
            pad = "z" * 4000
            version = 0
            while not sample(kit.hub.metrics, "apix_slow_consumers_total"):
                assert version < 2000, "the slow subscriber was never closed"
                version = ok(await writer.call("state.set", key="doc.big", value=pad))["version"]
                assert [p["version"] for p in await wait_state(good, 1)] == [version]
            frames = await slow.until_closed()
            assert slow.close_code == 4009
            seen = [f["version"] for f in frames if f.get("push") == "state"]
            assert seen == list(range(1, len(seen) + 1))
            await wait_eof(slow)  # the server has cleaned the connection up
            assert sample(kit.hub.metrics, "apix_state_subscribers") == 1  # the good one
            await good.hang_up()
            await writer.hang_up()


# -- resume ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_resume_restores_state_subscriptions_with_current_values(tmp_path, request, backend):
    broker = backend_settings(request, backend)
    async with running_server(tmp_path, broker=broker) as kit:
        with trio.fail_after(STEP):
            alice, first = await open_peer(kit, sub="alice")
            bob, _ = await open_peer(kit, sub="bob")
            ok(await alice.call("state.subscribe", key="doc.2"))
            ok(await alice.call("state.subscribe", key="doc.quiet"))
            ok(await alice.call("subscribe", channel="chat.a"))
            await alice.hang_up()
            assert sample(kit.hub.metrics, "apix_state_subscribers") == 0

            ok(await bob.call("state.set", key="doc.2", value={"while": "away"}))
            ok(await bob.call("state.patch", key="doc.2", patch={"more": 1}))
            alice, result = await open_peer(kit, sub="alice", resume={"session": first["session"]})
            assert result["resumed"] is True
            assert result["state"] == [
                {"key": "doc.2", "version": 2, "value": {"while": "away", "more": 1}},
                {"key": "doc.quiet", "version": 0, "value": None},
            ]
            assert [entry["channel"] for entry in result["channels"]] == ["chat.a"]
            assert state_pushes(alice) == []  # the values came in the result
            ok(await bob.call("state.patch", key="doc.2", patch={"more": 2}))
            assert await wait_state(alice, 1) == [
                {"push": "state", "key": "doc.2", "version": 3, "patch": {"more": 2}}
            ]
            assert sample(kit.hub.metrics, "apix_state_subscribers") == 2
            # Resumed again: still both keys (the record kept them).
            await alice.hang_up()
            alice, result = await open_peer(kit, sub="alice", resume={"session": first["session"]})
            assert [(e["key"], e["version"]) for e in result["state"]] == [
                ("doc.2", 3),
                ("doc.quiet", 0),
            ]
            await alice.hang_up()
            await bob.hang_up()


async def test_a_state_key_the_new_token_may_not_use_is_left_out(tmp_path):
    async with running_server(tmp_path) as kit:
        with trio.fail_after(STEP):
            alice, first = await open_peer(kit)
            ok(await alice.call("state.subscribe", key="doc.open"))
            ok(await alice.call("state.subscribe", key="secret.x"))
            await alice.hang_up()
            alice, result = await open_peer(
                kit, state=("doc.>",), resume={"session": first["session"]}
            )
            assert [entry["key"] for entry in result["state"]] == ["doc.open"]
            await alice.hang_up()
            alice, result = await open_peer(kit, resume={"session": first["session"]})
            assert [entry["key"] for entry in result["state"]] == ["doc.open"]
            await alice.hang_up()


async def test_a_fresh_auth_has_no_state_list_and_a_fresh_session_no_keys(tmp_path):
    async with running_server(tmp_path) as kit:
        with trio.fail_after(STEP):
            alice, first = await open_peer(kit)
            assert "state" not in first
            ok(await alice.call("state.subscribe", key="doc.a"))
            await alice.hang_up()
            other, result = await open_peer(
                kit, sub="mallory", resume={"session": first["session"]}
            )
            assert result["resumed"] is False and "state" not in result
            await other.hang_up()
