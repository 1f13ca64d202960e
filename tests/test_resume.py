"""Sessions end to end, in process: resume, expiry, isolation, offline buffering, catch-up.

Servers run inside the test's trio run (`tests.serverkit.running_server`, real
sockets), on the embedded broker or on a real redis-server; the client is a
wsproto client over a TCP socket (`tests.memws.MemClient`). Expiry is tested
on a MockClock with an in-memory hub (`tests.memws.memory_hub`).

No test waits for time to pass on the real clock: a client learns that the
server has finished with a connection from the server's side of the TCP
stream closing (its cleanup runs before the socket closes).
"""

from __future__ import annotations

import socket
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from wsproto.events import CloseConnection

from apix_trio.broker.model import Retention
from apix_trio.settings import ChannelOptions, Namespace
from tests.memws import MemClient, memory_hub
from tests.serverkit import Kit, running_server

pytestmark = pytest.mark.timeout(90)

NAMESPACES = (
    Namespace("small.>", ChannelOptions(history_size=5, history_ttl=3600)),
    Namespace("user.>", ChannelOptions(history_size=1000, history_ttl=86400)),
    Namespace("bulk.>", ChannelOptions(history_size=200_000, history_ttl=3600)),
)
STEP = 30.0


@attrs.define
class Peer:
    """A wsproto client over TCP that keeps every push it sees."""

    client: MemClient
    pushes: list[dict[str, Any]] = attrs.Factory(list)
    next_id: int = 0

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send an op; collect pushes until its reply, which is returned."""
        self.next_id += 1
        await self.client.send({"op": op, "id": self.next_id, **fields})
        while True:
            frame = await self.client.recv()
            assert frame is not None, f"closed with {self.client.close_code} awaiting {op}"
            if "push" in frame:
                self.pushes.append(frame)
            elif frame.get("id") == self.next_id:
                return frame

    async def events(self, count: int) -> list[dict[str, Any]]:
        """Read until `count` event pushes were seen in all; take them all."""
        while sum(1 for p in self.pushes if p.get("push") == "event") < count:
            frame = await self.client.recv()
            assert frame is not None, f"closed with {self.client.close_code}"
            if "push" in frame:
                self.pushes.append(frame)
        events = [p for p in self.pushes if p.get("push") == "event"]
        self.pushes = [p for p in self.pushes if p.get("push") != "event"]
        return events

    def taken_events(self) -> list[dict[str, Any]]:
        events = [p for p in self.pushes if p.get("push") == "event"]
        self.pushes = [p for p in self.pushes if p.get("push") != "event"]
        return events

    async def hang_up(self) -> None:
        """Close and wait until the server has cleaned the connection up."""
        await send_close(self.client)
        await wait_eof(self.client)


async def send_close(client: MemClient) -> None:
    await client.stream.send_all(client.ws.send(CloseConnection(code=1000)))


async def wait_eof(client: MemClient) -> None:
    """Read until the server closes TCP (after its cleanup ran)."""
    try:
        while await client.stream.receive_some(65536):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def open_peer(kit: Kit, **claims: Any) -> tuple[Peer, dict[str, Any]]:
    """Connect; `auth` with `kit.token(**claims)` and an optional `resume`."""
    resume = claims.pop("resume", None)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.connect(("127.0.0.1", kit.running.ws_port))
    client = MemClient(trio.SocketStream(sock))
    await client.handshake([])
    peer = Peer(client)
    fields: dict[str, Any] = {"token": kit.token(**claims)}
    if resume is not None:
        fields["resume"] = resume
    reply = await peer.call("auth", **fields)
    assert reply["ok"], reply
    return peer, reply["result"]


def ids_of(events: list[dict[str, Any]], channel: str | None = None) -> list[str]:
    return [e["event"]["id"] for e in events if channel is None or e["channel"] == channel]


async def publish_many(kit: Kit, channel: str, count: int, org: str = "acme") -> list[str]:
    """Publish straight into the broker (fast), as a service would."""
    hub = kit.hub
    retention = hub.namespaces.retention(channel)
    out = []
    for n in range(count):
        published = await hub.broker.publish(
            org, channel, f'{{"n":{n}}}', sender="svc", key=None, retention=retention
        )
        out.append(published.event.id)
    return out


# -- resume on the same node / another node ------------------------------------


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_resume_delivers_what_was_missed_then_live(tmp_path, request, backend):
    broker = {"redis_url": request.getfixturevalue("redis_url")} if backend == "redis" else {}
    async with running_server(tmp_path, broker=broker, namespaces=NAMESPACES) as kit:
        with trio.fail_after(STEP):
            alice, first = await open_peer(kit)
            for channel in ("chat.a", "chat.b", "chat.c"):
                assert (await alice.call("subscribe", channel=channel))["ok"]
            seen = await publish_many(kit, "chat.a", 3)
            assert ids_of(await alice.events(3)) == seen
            await alice.hang_up()

            missed_a = await publish_many(kit, "chat.a", 4)
            missed_b = await publish_many(kit, "chat.b", 2)
            alice, result = await open_peer(kit, resume={"session": first["session"]})
            assert result["resumed"] is True
            assert result["session"] == first["session"]
            assert result["conn"] != first["conn"]
            by_channel = {entry["channel"]: entry for entry in result["channels"]}
            assert set(by_channel) == {"chat.a", "chat.b", "chat.c"}
            assert [by_channel[c]["replayed"] for c in ("chat.a", "chat.b", "chat.c")] == [4, 2, 0]
            assert all(entry["recovered"] for entry in result["channels"])
            # Everything missed came before the reply, in order, per channel.
            replayed = alice.taken_events()
            assert ids_of(replayed, "chat.a") == missed_a
            assert ids_of(replayed, "chat.b") == missed_b
            live = await publish_many(kit, "chat.c", 1) + await publish_many(kit, "chat.a", 1)
            assert ids_of(await alice.events(2)) == live
            await alice.hang_up()


async def test_resume_on_another_node_of_the_same_redis(tmp_path, redis_url):
    broker = {"redis_url": redis_url}
    async with (
        running_server(tmp_path, broker=broker, namespaces=NAMESPACES) as node_a,
        running_server(tmp_path, broker=broker, namespaces=NAMESPACES) as node_b,
    ):
        with trio.fail_after(STEP):
            alice, first = await open_peer(node_a)
            assert (await alice.call("subscribe", channel="chat.x"))["ok"]
            seen = await publish_many(node_a, "chat.x", 5)
            assert ids_of(await alice.events(5)) == seen
            await alice.hang_up()
            missed = await publish_many(node_b, "chat.x", 7)
            alice, result = await open_peer(node_b, resume={"session": first["session"]})
            assert result["resumed"] is True
            assert result["channels"] == [
                {"channel": "chat.x", "position": missed[-1], "recovered": True, "replayed": 7}
            ]
            assert ids_of(alice.taken_events()) == missed
            await alice.hang_up()


async def test_graceful_shutdown_writes_exact_server_positions(tmp_path, redis_url):
    """1001 from node A, resume on node B without client positions: only what
    was published after the last delivered event comes, nothing twice."""
    broker = {"redis_url": redis_url}
    async with running_server(tmp_path, broker=broker, namespaces=NAMESPACES) as node_b:
        with trio.fail_after(STEP):
            async with trio.open_nursery() as nursery:
                async with running_server(tmp_path, broker=broker, namespaces=NAMESPACES) as a:
                    alice, first = await open_peer(a)
                    for channel in ("chat.a", "chat.b"):
                        assert (await alice.call("subscribe", channel=channel))["ok"]
                    delivered = await publish_many(a, "chat.a", 9)
                    assert ids_of(await alice.events(9)) == delivered
                    # Answers the close frame as soon as it comes.
                    nursery.start_soon(alice.client.until_closed)
            # Node A is gone; alice was told 1001.
            assert alice.client.close_code == 1001
            missed = await publish_many(node_b, "chat.a", 2)
            alice, result = await open_peer(node_b, resume={"session": first["session"]})
            assert result["resumed"] is True
            assert ids_of(alice.taken_events()) == missed
            await alice.hang_up()


async def test_client_positions_take_precedence(tmp_path):
    async with running_server(tmp_path, namespaces=NAMESPACES) as kit:
        with trio.fail_after(STEP):
            alice, first = await open_peer(kit)
            for channel in ("chat.a", "chat.b"):
                assert (await alice.call("subscribe", channel=channel))["ok"]
            a = await publish_many(kit, "chat.a", 6)
            b = await publish_many(kit, "chat.b", 3)
            await alice.events(9)
            await alice.hang_up()
            # The app only processed a[:2]; chat.b goes by the server's position.
            resume = {"session": first["session"], "positions": {"chat.a": a[1]}}
            alice, result = await open_peer(kit, resume=resume)
            replayed = alice.taken_events()
            assert ids_of(replayed, "chat.a") == a[2:]
            assert ids_of(replayed, "chat.b") == []
            assert {e["channel"]: e["replayed"] for e in result["channels"]} == {
                "chat.a": 4,
                "chat.b": 0,
            }
            assert b  # published and already delivered before the drop
            await alice.hang_up()


async def test_positions_beyond_retention_are_not_recovered(tmp_path):
    async with running_server(tmp_path, namespaces=NAMESPACES) as kit:
        with trio.fail_after(STEP):
            alice, first = await open_peer(kit)
            assert (await alice.call("subscribe", channel="small.feed"))["ok"]
            await alice.hang_up()
            published = await publish_many(kit, "small.feed", 12)  # history keeps 5
            alice, result = await open_peer(kit, resume={"session": first["session"]})
            assert result["resumed"] is True
            (entry,) = result["channels"]
            assert (entry["recovered"], entry["replayed"]) == (False, 5)
            assert ids_of(alice.taken_events()) == published[-5:]
            await alice.hang_up()


async def test_a_subscription_the_new_token_may_not_have_is_reported(tmp_path):
    async with running_server(tmp_path, namespaces=NAMESPACES) as kit:
        with trio.fail_after(STEP):
            alice, first = await open_peer(kit)
            for channel in ("chat.a", "secret.x"):
                assert (await alice.call("subscribe", channel=channel))["ok"]
            await alice.hang_up()
            alice, result = await open_peer(
                kit, subs=("chat.>",), resume={"session": first["session"]}
            )
            by_channel = {entry["channel"]: entry for entry in result["channels"]}
            assert by_channel["chat.a"]["recovered"] is True
            assert by_channel["secret.x"]["error"]["code"] == "forbidden"
            assert by_channel["secret.x"]["recovered"] is False
            await alice.hang_up()
            # The refused channel is gone from the session for good.
            alice, result = await open_peer(kit, resume={"session": first["session"]})
            assert [entry["channel"] for entry in result["channels"]] == ["chat.a"]
            await alice.hang_up()


async def test_a_resumed_session_can_be_resumed_again(tmp_path):
    async with running_server(tmp_path, namespaces=NAMESPACES) as kit:
        with trio.fail_after(STEP):
            alice, first = await open_peer(kit)
            session = first["session"]
            assert (await alice.call("subscribe", channel="chat.a"))["ok"]
            for round_ in range(3):
                await alice.hang_up()
                missed = await publish_many(kit, "chat.a", round_ + 1)
                alice, result = await open_peer(kit, resume={"session": session})
                assert (result["resumed"], result["session"]) == (True, session)
                assert ids_of(alice.taken_events()) == missed
                if round_ == 1:
                    assert (await alice.call("subscribe", channel="chat.b"))["ok"]
                    assert (await alice.call("unsubscribe", channel="chat.a"))["ok"]
                    assert (await alice.call("subscribe", channel="chat.a"))["ok"]
            assert sorted(e["channel"] for e in result["channels"]) == ["chat.a", "chat.b"]
            await alice.hang_up()


async def test_group_memberships_are_restored_through_the_group_path(tmp_path):
    async with running_server(tmp_path, namespaces=NAMESPACES) as kit:
        with trio.fail_after(STEP):
            alice, first = await open_peer(kit)
            reply = await alice.call("subscribe", channel="jobs.render", group="workers")
            assert reply["ok"], reply
            assert (await alice.call("subscribe", channel="chat.a"))["ok"]
            await alice.hang_up()
            alice, result = await open_peer(kit, resume={"session": first["session"]})
            by_key = {(e["channel"], e.get("group")): e for e in result["channels"]}
            assert set(by_key) == {("jobs.render", "workers"), ("chat.a", None)}
            assert "error" not in by_key["jobs.render", "workers"]
            assert kit.hub.groups.memberships(next(iter(kit.hub.registry))) == [
                ("jobs.render", "workers")
            ]
            (job,) = await publish_many(kit, "jobs.render", 1)
            (push,) = await alice.events(1)
            assert (push["event"]["id"], push["group"]) == (job, "workers")
            await alice.hang_up()


async def test_resume_while_the_old_connection_lingers_fences_it_off(tmp_path, redis_url):
    """The client gave up on node A and resumed on node B before A noticed:
    A's connection, closing later, must not overwrite B's record."""
    broker = {"redis_url": redis_url}
    async with (
        running_server(tmp_path, broker=broker, namespaces=NAMESPACES) as node_a,
        running_server(tmp_path, broker=broker, namespaces=NAMESPACES) as node_b,
    ):
        with trio.fail_after(STEP):
            old, first = await open_peer(node_a)
            session = first["session"]
            assert (await old.call("subscribe", channel="chat.old"))["ok"]
            new, result = await open_peer(node_b, resume={"session": session})
            assert result["resumed"] is True
            assert (await new.call("unsubscribe", channel="chat.old"))["ok"]
            assert (await new.call("subscribe", channel="chat.new"))["ok"]
            assert (await old.call("subscribe", channel="chat.zombie"))["ok"]
            await old.hang_up()  # A writes its final record now: fenced off
            await node_a.hub.sessions.flush()
            await new.hang_up()
            await node_b.hub.sessions.flush()
            again, result = await open_peer(node_a, resume={"session": session})
            assert [entry["channel"] for entry in result["channels"]] == ["chat.new"]
            await again.hang_up()


# -- refused resumes --------------------------------------------------------------


@pytest.mark.parametrize(
    "claims", [{"sub": "mallory"}, {"org": "globex"}, {"org": "globex", "sub": "alice"}]
)
async def test_another_sub_or_org_gets_a_fresh_session_and_learns_nothing(tmp_path, capsys, claims):
    async with running_server(tmp_path, namespaces=NAMESPACES) as kit:
        with trio.fail_after(STEP):
            alice, first = await open_peer(kit)
            assert (await alice.call("subscribe", channel="chat.topsecret"))["ok"]
            await publish_many(kit, "chat.topsecret", 3)
            await alice.events(3)
            await alice.hang_up()
            capsys.readouterr()
            other, result = await open_peer(kit, resume={"session": first["session"]}, **claims)
            assert result["resumed"] is False
            assert result["session"] != first["session"]
            assert "channels" not in result
            await publish_many(kit, "chat.topsecret", 1)
            assert (await other.call("ping"))["ok"]
            assert other.taken_events() == []
            await other.hang_up()
            logged = capsys.readouterr()
            assert "resume_refused" in logged.err
            assert "topsecret" not in logged.out + logged.err
            # The owner can still resume it: the refusal did not consume it.
            alice, result = await open_peer(kit, resume={"session": first["session"]})
            assert result["resumed"] is True
            assert ids_of(alice.taken_events()) != []
            await alice.hang_up()


async def test_unknown_session_gets_resumed_false(tmp_path):
    async with running_server(tmp_path) as kit:
        with trio.fail_after(STEP):
            peer, result = await open_peer(kit, resume={"session": "no-such-session"})
            assert result["resumed"] is False
            assert result["session"] != "no-such-session"
            await peer.hang_up()


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_session_expires_ttl_after_the_connection_drops(tmp_path, autojump_clock):
    ttl = 60.0
    async with memory_hub(
        tmp_path, sessions={"ttl": ttl}, heartbeat={"interval": 100_000.0}
    ) as mem:
        mem.nursery.start_soon(mem.hub.sessions.serve)

        async def connect(**resume: Any) -> tuple[MemClient, dict[str, Any]]:
            client = await mem.connect()
            fields: dict[str, Any] = {"token": mem.token()}
            if resume:
                fields["resume"] = resume
            reply = await client.call("auth", **fields)
            assert reply["ok"], reply
            return client, reply["result"]

        client, first = await connect()
        assert (await client.call("subscribe", channel="chat.a"))["ok"]
        # Connected for many TTLs: the keeper keeps the record alive.
        await trio.sleep(5 * ttl)
        assert await mem.hub.sessions.store.load("acme", first["session"]) is not None
        await send_close(client)
        await wait_eof(client)
        await trio.sleep(ttl - 1)
        client, result = await connect(session=first["session"])
        assert result["resumed"] is True
        await send_close(client)
        await wait_eof(client)
        dropped_at = trio.current_time()
        await trio.sleep(ttl)
        client, result = await connect(session=first["session"])
        assert result["resumed"] is False
        assert result["session"] != first["session"]
        assert trio.current_time() == dropped_at + ttl
        await send_close(client)
        await wait_eof(client)


# -- offline buffering -----------------------------------------------------------


async def test_offline_user_gets_all_500_events_by_resume_or_since(tmp_path):
    async with running_server(tmp_path, namespaces=NAMESPACES) as kit:
        with trio.fail_after(STEP):
            bob, first = await open_peer(kit, sub="bob", subs=("user.{sub}",))
            position = (await bob.call("subscribe", channel="user.bob"))["result"]["position"]
            await bob.hang_up()
            sent = await publish_many(kit, "user.bob", 500)

            bob, result = await open_peer(
                kit, sub="bob", subs=("user.{sub}",), resume={"session": first["session"]}
            )
            assert result["channels"] == [
                {"channel": "user.bob", "position": sent[-1], "recovered": True, "replayed": 500}
            ]
            events = bob.taken_events()
            assert ids_of(events) == sent
            assert [e["event"]["data"]["n"] for e in events] == list(range(500))
            await bob.hang_up()

            # Without a session: `since` the last id seen gives the same.
            bob, _ = await open_peer(kit, sub="bob", subs=("user.{sub}",))
            reply = await bob.call("subscribe", channel="user.bob", since=position)
            assert (reply["result"]["replayed"], reply["result"]["recovered"]) == (500, True)
            assert ids_of(bob.taken_events()) == sent
            await bob.hang_up()


# -- a huge catch-up -------------------------------------------------------------


async def test_100k_missed_events_are_paced_by_the_client_not_dropped(tmp_path):
    missed_count, live_count = 100_000, 2_000
    async with running_server(tmp_path, namespaces=NAMESPACES) as kit:
        hub = kit.hub
        limit = kit.settings.limits.outbox_size
        with trio.fail_after(STEP):
            peer, first = await open_peer(kit)
            assert (await peer.call("subscribe", channel="bulk.feed"))["ok"]
            assert (await peer.call("subscribe", channel="chat.side"))["ok"]
            await peer.hang_up()
            missed = await publish_many(kit, "bulk.feed", missed_count)

        with trio.fail_after(60):
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            await sock.connect(("127.0.0.1", kit.running.ws_port))
            client = MemClient(trio.SocketStream(sock))
            await client.handshake([])
            await client.send(
                {
                    "op": "auth",
                    "id": 1,
                    "token": kit.token(),
                    "resume": {"session": first["session"]},
                }
            )
            frames: list[dict[str, Any]] = []
            live: list[str] = []
            reply: dict[str, Any] = {}
            async with trio.open_nursery() as nursery:

                async def publish_live() -> None:
                    # Live events on both channels while the catch-up runs.
                    retention = Retention(history_size=200_000, history_ttl=3600)
                    for n in range(live_count):
                        channel = "bulk.feed" if n % 2 else "chat.side"
                        published = await hub.broker.publish(
                            "acme", channel, str(n), sender="svc", key=None, retention=retention
                        )
                        if channel == "bulk.feed":
                            live.append(published.event.id)
                        if n % 50 == 0:
                            await trio.lowlevel.checkpoint()

                feed = 0
                while feed < missed_count + live_count // 2:
                    frame = await client.recv()
                    assert frame is not None, f"closed with {client.close_code}"
                    if frame.get("id") == 1:
                        reply = frame
                        continue
                    frames.append(frame)
                    feed += frame.get("channel") == "bulk.feed"
                    if len(frames) == 1000:
                        nursery.start_soon(publish_live)

        assert reply["ok"] and reply["result"]["resumed"] is True
        by_channel = {entry["channel"]: entry for entry in reply["result"]["channels"]}
        assert by_channel["bulk.feed"]["recovered"] is True
        assert by_channel["bulk.feed"]["replayed"] >= missed_count
        feed_ids = [f["event"]["id"] for f in frames if f.get("channel") == "bulk.feed"]
        assert feed_ids == missed + live  # in order, no gap, no duplicate
        (conn,) = list(hub.registry)
        stats = conn.outbox.statistics()
        assert stats.high_water_items <= limit
        assert hub.metrics.registry.get_sample_value("apix_slow_consumers_total") in (None, 0.0)
        assert not conn.closing
