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

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
from wsproto.utilities import LocalProtocolError

from apix_trio.devkeys import ensure_dev_keys, mint_token
from tests.conftest import RedisServer
from tests.memws import MemClient

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent
CHANNELS = ("feed.one", "feed.two", "feed.three")
WINDOW = 16
MAX_PUBLISHES = 30_000  # a bound, never reached unless something is wrong
SEEN_BEFORE_KILL = 120
LIVE_AFTER_RESUME = 60


@attrs.define
class Node:
    process: trio.Process
    ws_port: int = 0
    lines: list[dict[str, Any]] = attrs.Factory(list)
    raw: list[bytes] = attrs.Factory(list)
    listening: trio.Event = attrs.Factory(trio.Event)


async def _read_log(node: Node) -> None:
    stream = node.process.stderr
    assert stream is not None
    buffer = b""
    while chunk := await stream.receive_some(65536):
        *complete, buffer = (buffer + chunk).split(b"\n")
        for raw in complete:
            node.raw.append(raw)
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(line, dict):
                node.lines.append(line)
                if line.get("event") == "listening":
                    node.ws_port = int(line["ws_port"])
                    node.listening.set()


@asynccontextmanager
async def node_process(name: str, key_dir: Path, redis_url: str) -> AsyncIterator[Node]:
    """`python -m apix_trio serve` on free ports with the Redis broker."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("APIX_")}
    env.update(
        APIX_SERVER_WS_PORT="0",
        APIX_SERVER_HTTP_PORT="0",
        APIX_SERVER_NODE_ID=name,
        APIX_BROKER_REDIS_URL=redis_url,
        APIX_AUTH_DEV_KEY_DIR=str(key_dir),
        APIX_DEFAULTS_HISTORY_SIZE="100000",
        APIX_LIMITS_OPS_PER_SECOND="1000000",
        APIX_LOG_LEVEL="info",
        APIX_LOG_FORMAT="json",
        PYTHONPATH=str(REPO),
    )
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "apix_trio", "serve"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        cwd=str(REPO),
    )
    node = Node(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_log, node)
            with trio.fail_after(20):
                await node.listening.wait()
            yield node
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


async def connect(node: Node, token: str, **auth: Any) -> tuple[MemClient, dict[str, Any]]:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.connect(("127.0.0.1", node.ws_port))
    client = MemClient(trio.SocketStream(sock))
    await client.handshake([])
    reply = await client.call("auth", token=token, **auth)
    assert reply["ok"], reply
    return client, reply["result"]


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
    private, _, _ = ensure_dev_keys(key_dir)

    def token(sub: str) -> str:
        return mint_token(private, org="acme", sub=sub, pub=(">",), sub_patterns=(">",))

    subscriber = Subscriber()
    async with (
        node_process("node-a", key_dir, redis_server.url) as node_a,
        node_process("node-b", key_dir, redis_server.url) as node_b,
    ):
        with trio.fail_after(60):
            client, first = await connect(node_a, token("alice"))
            for channel in CHANNELS:
                assert (await client.call("subscribe", channel=channel))["ok"]
            pub_client, _ = await connect(node_b, token("pub"))
            publisher = Publisher(pub_client)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(publisher.run)
                await read_until_dead(
                    client, subscriber, lambda: node_a.process.send_signal(signal.SIGKILL)
                )
                assert await node_a.process.wait() == -signal.SIGKILL

                resume: dict[str, Any] = {"session": first["session"]}
                if send_positions:
                    resume["positions"] = subscriber.positions()
                client, result = await connect_collecting(
                    node_b, token("alice"), resume, subscriber
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
        assert not [line for line in node_b.lines if line.get("level") in ("error", "critical")]
    return subscriber, publisher, result


async def connect_collecting(
    node: Node, token: str, resume: dict[str, Any], subscriber: Subscriber
) -> tuple[MemClient, dict[str, Any]]:
    """Auth with `resume`; the replayed events pushed before the reply go to
    `subscriber` (MemClient.call would drop them)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.connect(("127.0.0.1", node.ws_port))
    client = MemClient(trio.SocketStream(sock))
    await client.handshake([])
    await client.send({"op": "auth", "id": 1, "token": token, "resume": resume})
    while True:
        frame = await client.recv()
        assert frame is not None, client.close_code
        if frame.get("id") == 1:
            assert frame["ok"], frame
            return client, frame["result"]
        subscriber.take(frame)


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
