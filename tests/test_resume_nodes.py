"""Resume across real processes: node A dies by SIGKILL, the client resumes on node B.

Two `python -m apix_trio serve` processes share one real redis-server (the
`redis_server` fixture). A client on node A subscribes to three channels; a
publisher on node B publishes to all three, round robin, without pause. Once
the client has seen some events, node A is killed with SIGKILL (no goodbye,
no final session write: only what was saved on subscribe survives). The
client resumes its session on node B with the positions it saw, and the
publisher keeps going until the client has seen live events after the
resume. Every acknowledged event must reach the client exactly once, in
order, per channel.

A second test resumes on node B with the server's positions only (the
client sends none): positions then come from the last periodic flush (or
the subscribe), so the guarantee is in order without gaps, duplicates
allowed at the seam.
"""

from __future__ import annotations

import signal
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from wsproto.utilities import LocalProtocolError

from tests.conftest import RedisServer
from tests.memws import MemClient
from tests.procs import NodeProcess, call_keeping, open_node

pytestmark = pytest.mark.timeout(120)

CHANNELS = ("feed.one", "feed.two", "feed.three")
WINDOW = 16
MAX_PUBLISHES = 30_000  # a bound, never reached unless something is wrong
SEEN_BEFORE_KILL = 120
LIVE_AFTER_RESUME = 60
SETTINGS = {"defaults.history_size": 100_000, "limits.ops_per_second": 1_000_000}


def node_process(
    name: str, key_dir: Path, redis_url: str
) -> AbstractAsyncContextManager[NodeProcess]:
    """`python -m apix_trio serve` on free ports with the Redis broker."""
    return open_node(key_dir, name=name, redis_url=redis_url, settings=SETTINGS)


@attrs.define
class Publisher:
    """Publishes round robin over CHANNELS in windows until told to stop."""

    client: MemClient
    acked: dict[str, list[str]] = attrs.Factory(lambda: {c: [] for c in CHANNELS})
    stop: trio.Event = attrs.Factory(trio.Event)
    count: int = 0

    async def run(self) -> None:
        next_id = 1_000
        while not self.stop.is_set():
            assert self.count < MAX_PUBLISHES, "the client never caught up"
            sent: dict[int, str] = {}
            for _ in range(WINDOW):
                channel = CHANNELS[self.count % len(CHANNELS)]
                next_id += 1
                sent[next_id] = channel
                self.count += 1
                await self.client.send(
                    {"op": "publish", "id": next_id, "channel": channel, "data": self.count}
                )
            for _ in range(WINDOW):
                reply = await self.client.recv()
                assert reply is not None and reply["ok"], reply
                self.acked[sent[reply["id"]]].append(reply["result"]["id"])


@attrs.define
class Subscriber:
    """What the application saw, per channel, in arrival order."""

    seen: dict[str, list[str]] = attrs.Factory(lambda: {c: [] for c in CHANNELS})

    def take(self, frame: dict[str, Any]) -> None:
        if frame.get("push") == "event":
            self.seen[frame["channel"]].append(frame["event"]["id"])

    def total(self) -> int:
        return sum(len(ids) for ids in self.seen.values())

    def positions(self) -> dict[str, str]:
        return {channel: ids[-1] for channel, ids in self.seen.items() if ids}


async def read_until_dead(client: MemClient, subscriber: Subscriber, kill: Any) -> None:
    """Take events from node A; kill A once SEEN_BEFORE_KILL arrived; return
    when the connection is gone."""
    killed = False
    while True:
        try:
            frame = await client.recv()
        except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
            return  # reset by the dead peer, or EOF (MemClient cannot answer it)
        if frame is None:
            return
        subscriber.take(frame)
        if not killed and subscriber.total() >= SEEN_BEFORE_KILL:
            killed = True
            kill()


async def run_scenario(
    tmp_path: Path, redis_server: RedisServer, *, send_positions: bool
) -> tuple[Subscriber, Publisher, dict[str, Any]]:
    key_dir = tmp_path / "keys"
    subscriber = Subscriber()
    async with (
        node_process("node-a", key_dir, redis_server.url) as node_a,
        node_process("node-b", key_dir, redis_server.url) as node_b,
    ):
        with trio.fail_after(60):
            client = await node_a.open_client()
            first = await client.call("auth", token=node_a.token("alice"))
            assert first["ok"], first
            for channel in CHANNELS:
                assert (await client.call("subscribe", channel=channel))["ok"]
            pub_client = await node_b.connect(node_b.token("pub"))
            publisher = Publisher(pub_client)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(publisher.run)
                await read_until_dead(client, subscriber, lambda: node_a.signal(signal.SIGKILL))
                assert await node_a.process.wait() == -signal.SIGKILL

                resume: dict[str, Any] = {"session": first["result"]["session"]}
                if send_positions:
                    resume["positions"] = subscriber.positions()
                client, result = await connect_collecting(
                    node_b, node_b.token("alice"), resume, subscriber
                )
                before_live = subscriber.total()
                while subscriber.total() < before_live + LIVE_AFTER_RESUME:
                    frame = await client.recv()
                    assert frame is not None, client.close_code
                    subscriber.take(frame)
                publisher.stop.set()
            # The publisher stopped: read until every acked event arrived.
            while any(subscriber.seen[c][-1:] != publisher.acked[c][-1:] for c in CHANNELS):
                frame = await client.recv()
                assert frame is not None, client.close_code
                subscriber.take(frame)
        assert not node_b.problems()
    return subscriber, publisher, result


async def connect_collecting(
    node: NodeProcess, token: str, resume: dict[str, Any], subscriber: Subscriber
) -> tuple[MemClient, dict[str, Any]]:
    """Auth with `resume`; the replayed events pushed before the reply go to
    `subscriber` (MemClient.call would drop them)."""
    client = await node.open_client()
    pushes: list[dict[str, Any]] = []
    reply = await call_keeping(client, "auth", pushes, token=token, resume=resume)
    assert reply["ok"], reply
    for frame in pushes:
        subscriber.take(frame)
    return client, reply["result"]


async def test_sigkilled_node_client_resumes_on_another_exactly_once(tmp_path, redis_server):
    subscriber, publisher, result = await run_scenario(tmp_path, redis_server, send_positions=True)
    assert result["resumed"] is True
    assert sorted(entry["channel"] for entry in result["channels"]) == sorted(CHANNELS)
    assert all(entry["recovered"] for entry in result["channels"])
    assert sum(entry["replayed"] for entry in result["channels"]) > 0
    for channel in CHANNELS:
        assert subscriber.seen[channel] == publisher.acked[channel], channel


async def test_resume_with_server_positions_has_no_gap(tmp_path, redis_server):
    subscriber, publisher, result = await run_scenario(tmp_path, redis_server, send_positions=False)
    assert result["resumed"] is True
    for channel in CHANNELS:
        seen, acked = subscriber.seen[channel], publisher.acked[channel]
        # Duplicates are possible at the seam (positions a flush behind);
        # nothing is missing and the order is kept.
        assert list(dict.fromkeys(seen)) == acked, channel
