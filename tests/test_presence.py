"""Presence end to end, in process: the wire contract, the seam, resume.

Servers run inside the test's trio run (`tests.serverkit.running_server`,
real sockets), on the embedded broker or on a real redis-server; clients are
wsproto clients over TCP (`tests.test_resume.Peer`). Every wait is bounded
by `fail_after`; nothing sleeps to let things settle: a client knows a
change reached it when its push arrives, and that nothing more is coming
when a later probe change arrives first (changes of one channel come in
order).
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio

from apix_trio.settings import ChannelOptions, Namespace
from tests.serverkit import Kit, running_server
from tests.test_resume import Peer, open_peer, send_close, wait_eof

pytestmark = pytest.mark.timeout(120)

NAMESPACES = (
    Namespace("chat.>", ChannelOptions(presence=True)),
    Namespace("tiny.>", ChannelOptions(presence=True)),
)
STEP = 30.0


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "redis":
        return {"redis_url": request.getfixturevalue("redis_url")}
    return {}


async def next_presence(peer: Peer) -> dict[str, Any]:
    """The next presence push (kept ones first), skipping nothing else."""
    while True:
        for index, push in enumerate(peer.pushes):
            if push.get("push") == "presence":
                return peer.pushes.pop(index)
        frame = await peer.client.recv()
        assert frame is not None, f"closed with {peer.client.close_code}"
        if "push" in frame:
            peer.pushes.append(frame)


def change(push: dict[str, Any]) -> tuple[str, str]:
    kind = "join" if "join" in push else "leave"
    return kind, push[kind]["conn"]


async def test_subscribe_with_presence_join_leave_query_and_errors(tmp_path, backend):
    async with running_server(
        tmp_path,
        broker=backend,
        namespaces=NAMESPACES,
        presence={"max_members": 3},
        limits={"ops_per_second": 10_000},
    ) as kit:
        with trio.fail_after(STEP):
            alice, a = await open_peer(kit, sub="alice", extra_claims={"info": {"name": "Al"}})
            reply = await alice.call("subscribe", channel="chat.a", presence=True)
            result = reply["result"]
            assert result["channel"] == "chat.a" and result["replayed"] == 0
            (me,) = result["presence"]["members"]
            assert result["presence"]["total"] == 1
            assert (me["sub"], me["conn"], me["info"]) == ("alice", a["conn"], {"name": "Al"})
            assert isinstance(me["since"], int)

            bob, b = await open_peer(kit, sub="bob")
            reply = await bob.call("subscribe", channel="chat.a", presence=True)
            members = reply["result"]["presence"]["members"]
            assert [m["conn"] for m in members] == [a["conn"], b["conn"]]
            assert "info" not in members[1]
            push = await next_presence(alice)
            assert push == {"push": "presence", "channel": "chat.a", "join": members[1]}

            # A second alice connection, then the query: total, distinct users.
            alice2, a2 = await open_peer(kit, sub="alice")
            assert (await alice2.call("subscribe", channel="chat.a", presence=True))["ok"]
            query = (await bob.call("presence", channel="chat.a"))["result"]
            assert (query["total"], query["users"]) == (3, 2)
            assert [m["conn"] for m in query["members"]] == [a["conn"], b["conn"], a2["conn"]]
            limited = (await bob.call("presence", channel="chat.a", limit=1))["result"]
            assert ([m["conn"] for m in limited["members"]], limited["total"]) == ([a["conn"]], 3)
            assert (await next_presence(alice)) == {
                "push": "presence",
                "channel": "chat.a",
                "join": query["members"][2],
            }

            # Full: limit_exceeded, and no subscription was made.
            carol, _ = await open_peer(kit, sub="carol")
            full = await carol.call("subscribe", channel="chat.a", presence=True)
            assert full["error"]["code"] == "limit_exceeded"
            await bob.call("publish", channel="chat.a", data={"n": 1})
            event = (await alice.events(1))[0]
            assert event["event"]["data"] == {"n": 1}
            assert (await carol.call("presence", channel="chat.a"))["result"]["total"] == 3

            # Unsubscribe leaves; closing leaves; alice sees both, once each.
            assert (await bob.call("unsubscribe", channel="chat.a"))["ok"]
            assert change(await next_presence(alice)) == ("leave", b["conn"])
            await alice2.hang_up()
            assert change(await next_presence(alice)) == ("leave", a2["conn"])
            assert (await carol.call("subscribe", channel="chat.a", presence=True))["ok"]
            joined = await next_presence(alice)
            assert joined["join"]["sub"] == "carol"
            assert carol.pushes == [] and [p for p in bob.pushes if p["push"] == "presence"] == [
                {"push": "presence", "channel": "chat.a", "join": query["members"][2]}
            ]

            # No presence on the namespace; no permission; with a group.
            nope = await alice.call("subscribe", channel="plain.a", presence=True)
            assert nope["error"]["code"] == "forbidden"
            nope = await alice.call("presence", channel="plain.a")
            assert nope["error"]["code"] == "forbidden"
            dave, _ = await open_peer(kit, sub="dave", subs=("other.>",))
            nope = await dave.call("presence", channel="chat.a")
            assert nope["error"]["code"] == "forbidden"
            nope = await dave.call("subscribe", channel="chat.a", presence=True)
            assert nope["error"]["code"] == "forbidden"
            bad = await alice.call("subscribe", channel="chat.a", presence=True, group="g")
            assert bad["error"]["code"] == "bad_request"
            bad = await alice.call("presence", channel="chat.a", limit=0)
            assert bad["error"]["code"] == "bad_request"
            assert alice.pushes == []


async def test_subscribing_again_is_one_member_with_a_fresh_snapshot(tmp_path, backend):
    async with running_server(tmp_path, broker=backend, namespaces=NAMESPACES) as kit:
        with trio.fail_after(STEP):
            watcher, w = await open_peer(kit, sub="watcher")
            assert (await watcher.call("subscribe", channel="chat.a", presence=True))["ok"]
            alice, a = await open_peer(kit, sub="alice")
            plain = await alice.call("subscribe", channel="chat.a")
            assert "presence" not in plain["result"]
            first = await alice.call("subscribe", channel="chat.a", presence=True)
            again = await alice.call("subscribe", channel="chat.a", presence=True)
            for reply in (first, again):
                assert [m["conn"] for m in reply["result"]["presence"]["members"]] == [
                    w["conn"],
                    a["conn"],
                ]
            assert change(await next_presence(watcher)) == ("join", a["conn"])
            probe, p = await open_peer(kit, sub="probe")
            assert (await probe.call("subscribe", channel="chat.a", presence=True))["ok"]
            assert change(await next_presence(watcher)) == ("join", p["conn"])  # not a 2nd join
            assert change(await next_presence(alice)) == ("join", p["conn"])
            total = (await probe.call("presence", channel="chat.a"))["result"]["total"]
            assert total == 3


async def test_joins_and_leaves_racing_subscribes_are_neither_lost_nor_doubled(tmp_path, backend):
    """Churners join and leave while watchers subscribe with presence at
    random moments. Each watcher applies its snapshot, then its pushes,
    asserting no join of a member it has and no leave of one it lacks; once
    the churn ends it must hold exactly the final members, and the next push
    it gets must be a probe's join (nothing late, nothing extra)."""
    churners, rounds, watchers = 12, 8, 8
    rng = random.Random(7)
    async with running_server(
        tmp_path, broker=backend, namespaces=NAMESPACES, limits={"ops_per_second": 100_000}
    ) as kit:
        with trio.fail_after(60):
            peers: list[tuple[Peer, str]] = []

            async def churn(index: int) -> None:
                peer, auth = await open_peer(kit, sub=f"churner{index % 5}")
                for _ in range(rounds):
                    assert (await peer.call("subscribe", channel="chat.race", presence=True))["ok"]
                    if rng.random() < 0.5:
                        await trio.lowlevel.checkpoint()
                    assert (await peer.call("unsubscribe", channel="chat.race"))["ok"]
                if index % 3 == 0:  # some stay, some leave by closing
                    assert (await peer.call("subscribe", channel="chat.race", presence=True))["ok"]
                    if index % 2 == 0:
                        await peer.hang_up()
                        return
                    peers.append((peer, auth["conn"]))

            views: dict[str, set[str]] = {}
            watching: list[tuple[Peer, str]] = []

            async def watch(index: int) -> None:
                for _ in range(rng.randrange(0, 40)):
                    await trio.lowlevel.checkpoint()
                peer, auth = await open_peer(kit, sub=f"watcher{index}")
                reply = await peer.call("subscribe", channel="chat.race", presence=True)
                members = {m["conn"] for m in reply["result"]["presence"]["members"]}
                assert auth["conn"] in members
                views[auth["conn"]] = members
                watching.append((peer, auth["conn"]))

            async with trio.open_nursery() as nursery:
                for index in range(churners):
                    nursery.start_soon(churn, index)
                for index in range(watchers):
                    nursery.start_soon(watch, index)

            final = {conn for _, conn in peers} | {conn for _, conn in watching}
            # The leaves of the churners that hung up are queued on close:
            # write them, then a probe's join comes after every change.
            await kit.hub.presence.flush()
            probe, p = await open_peer(kit, sub="probe")
            assert (await probe.call("subscribe", channel="chat.race", presence=True))["ok"]

            async def converge(peer: Peer, conn: str) -> None:
                view = views[conn]
                while True:
                    kind, who = change(await next_presence(peer))
                    assert who != conn, "a push about the watcher itself"
                    if kind == "join":
                        assert who not in view, f"join of {who} doubled"
                        view.add(who)
                    else:
                        assert who in view, f"leave of {who}, never seen joining"
                        view.discard(who)
                    if who == p["conn"]:
                        break
                assert view == final | {p["conn"]}

            async with trio.open_nursery() as nursery:
                for peer, conn in watching:
                    nursery.start_soon(converge, peer, conn)
            query = await probe.call("presence", channel="chat.race", limit=10_000)
            assert {m["conn"] for m in query["result"]["members"]} == final | {p["conn"]}


async def test_a_resumed_session_rejoins_with_its_new_conn(tmp_path, backend):
    async with running_server(tmp_path, broker=backend, namespaces=NAMESPACES) as kit:
        with trio.fail_after(STEP):
            watcher, _ = await open_peer(kit, sub="watcher")
            assert (await watcher.call("subscribe", channel="chat.a", presence=True))["ok"]
            alice, first = await open_peer(kit, sub="alice")
            assert (await alice.call("subscribe", channel="chat.a", presence=True))["ok"]
            assert change(await next_presence(watcher)) == ("join", first["conn"])

            # The old connection is still open (its server has not noticed the
            # client went away) when the client resumes.
            again, second = await open_peer(kit, sub="alice", resume={"session": first["session"]})
            assert second["resumed"] is True
            (restored,) = second["channels"]
            assert restored["channel"] == "chat.a"
            members = restored["presence"]["members"]
            assert [m["conn"] for m in members][-1] == second["conn"]
            assert first["conn"] not in {m["conn"] for m in members}
            assert change(await next_presence(watcher)) == ("leave", first["conn"])
            assert change(await next_presence(watcher)) == ("join", second["conn"])
            # The old connection closes later: no second leave.
            await send_close(alice.client)
            await wait_eof(alice.client)
            probe, p = await open_peer(kit, sub="probe")
            assert (await probe.call("subscribe", channel="chat.a", presence=True))["ok"]
            assert change(await next_presence(watcher)) == ("join", p["conn"])
            assert change(await next_presence(again)) == ("join", p["conn"])
            query = (await probe.call("presence", channel="chat.a"))["result"]
            assert {m["sub"] for m in query["members"]} == {"watcher", "alice", "probe"}
            assert query["total"] == 3


async def test_the_same_channel_in_two_orgs_has_two_member_sets(tmp_path, backend):
    async with running_server(tmp_path, broker=backend, namespaces=NAMESPACES) as kit:
        with trio.fail_after(STEP):
            acme, a = await open_peer(kit, org="acme", sub="alice")
            globex, g = await open_peer(kit, org="globex", sub="alice")
            for peer in (acme, globex):
                assert (await peer.call("subscribe", channel="chat.a", presence=True))["ok"]
            for peer, conn in ((acme, a["conn"]), (globex, g["conn"])):
                query = (await peer.call("presence", channel="chat.a"))["result"]
                assert [m["conn"] for m in query["members"]] == [conn]
            probe, p = await open_peer(kit, org="acme", sub="probe")
            assert (await probe.call("subscribe", channel="chat.a", presence=True))["ok"]
            assert change(await next_presence(acme)) == ("join", p["conn"])
            assert globex.pushes == []


async def _presence_metrics(kit: Kit) -> dict[str, float]:
    text = kit.hub.metrics.render().decode()
    found = {}
    for line in text.splitlines():
        for name in (
            "apix_presence_members",
            "apix_presence_joins_total",
            "apix_presence_leaves_total",
        ):
            if line.startswith(name + " "):
                found[name] = float(line.split()[1])
    return found


async def test_metrics_count_this_nodes_members_joins_and_leaves(tmp_path):
    async with running_server(tmp_path, namespaces=NAMESPACES) as kit:
        with trio.fail_after(STEP):
            alice, _ = await open_peer(kit, sub="alice")
            bob, _ = await open_peer(kit, sub="bob")
            for channel in ("chat.a", "chat.b"):
                assert (await alice.call("subscribe", channel=channel, presence=True))["ok"]
            assert (await bob.call("subscribe", channel="chat.a", presence=True))["ok"]
            assert await _presence_metrics(kit) == {
                "apix_presence_members": 3.0,
                "apix_presence_joins_total": 3.0,
                "apix_presence_leaves_total": 0.0,
            }
            await alice.hang_up()
            await next_presence(bob)
            metrics = await _presence_metrics(kit)
            assert metrics["apix_presence_members"] == 1.0
            assert metrics["apix_presence_leaves_total"] == 2.0
