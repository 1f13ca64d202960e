"""`apix-trio serve --workers N`: real supervisor and worker processes on one Redis.

Which worker holds a connection is read from the workers' own log lines (every
line of a worker carries its `node`), so these tests see what an operator sees.
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

import pytest
import trio

from apix_trio.protocol.codes import CloseCode
from apix_trio.supervisor import reserve_port, restart_delay
from tests.memws import MemClient
from tests.procs import REPO, NodeProcess, open_node

pytestmark = pytest.mark.timeout(90)

CLIENTS = 24
"""Connections opened to find both workers: the kernel hashes each new
connection to a worker, so all 24 landing on one of two has odds of 2**-23."""


def test_restart_backoff_doubles_and_caps() -> None:
    assert [restart_delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert restart_delay(50) == 30.0


def test_port_zero_is_resolved_once_and_shareable() -> None:
    port, holder = reserve_port("127.0.0.1", 0)
    assert holder is not None and port > 0
    try:
        sharer = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sharer.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sharer.bind(("127.0.0.1", port))  # a worker binds beside the holder
        sharer.listen(1)
        sharer.close()
    finally:
        holder.close()
    assert reserve_port("127.0.0.1", 8123) == (8123, None)


def test_more_than_one_worker_needs_redis(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "apix_trio", "serve", "--workers", "2"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "APIX_AUTH_DEV_KEY_DIR": str(tmp_path)},
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "server.workers" in result.stderr
    assert "broker.redis_url" in result.stderr


@asynccontextmanager
async def two_workers(tmp_path: Path, redis_url: str) -> AsyncIterator[NodeProcess]:
    """A supervisor with two workers, both listening."""
    async with open_node(
        tmp_path / "keys",
        name="sup",
        redis_url=redis_url,
        settings={"server.workers": 2, "server.shutdown_grace": 5},
    ) as node:
        with trio.fail_after(20):
            await node.wait_log_count("listening", 2)
        yield node


def node_of(node: NodeProcess, conn: str) -> str:
    """The worker (node id) that logged `conn`'s authentication."""
    for line in node.lines:
        if line.get("event") == "auth_ok" and line.get("conn") == conn:
            return str(line["node"])
    raise AssertionError(f"no auth_ok line for {conn}")


async def clients_by_worker(node: NodeProcess) -> dict[str, list[MemClient]]:
    by_worker: dict[str, list[MemClient]] = {}
    for n in range(CLIENTS):
        client = await node.open_client()
        reply = await client.call("auth", token=node.token(f"user{n}"))
        assert reply["ok"], reply
        conn = reply["result"]["conn"]
        with trio.fail_after(5):
            while not any(
                line.get("event") == "auth_ok" and line.get("conn") == conn for line in node.lines
            ):
                await node.wait_log_count("auth_ok", len(node.events("auth_ok")) + 1)
        by_worker.setdefault(node_of(node, conn), []).append(client)
    return by_worker


async def test_two_workers_share_the_port_and_events(tmp_path: Path, redis_url: str) -> None:
    async with two_workers(tmp_path, redis_url) as node:
        started = {line["node"] for line in node.events("listening")}
        assert len(started) == 2 and all(name.startswith("sup-w") for name in started)
        assert {line["ws_port"] for line in node.events("listening")} == {node.ws_port}
        by_worker = await clients_by_worker(node)
        assert set(by_worker) == started, "both workers take connections"
        first, second = (clients[0] for clients in by_worker.values())
        reply = await first.call("subscribe", channel="chat.room")
        assert reply["ok"], reply
        reply = await second.call("publish", channel="chat.room", data={"n": 1})
        assert reply["ok"], reply
        with trio.fail_after(10):
            push = await first.recv()
        assert push is not None and push["push"] == "event"
        assert push["event"]["id"] == reply["result"]["id"]
        status, health = await node.http_get("/api/v1/health")
        assert status == 200 and health["node"] in started

        node.signal(signal.SIGTERM)
        everyone = [client for clients in by_worker.values() for client in clients]
        with trio.fail_after(15):
            for client in everyone:
                await client.until_closed()
            assert await node.wait_exit(within=15) == 0
        assert {client.close_code for client in everyone} == {CloseCode.GOING_AWAY}
        stopped = node.events("worker_stopped")
        assert sorted(line["code"] for line in stopped) == [0, 0]
        assert node.events("supervisor_stopped")[0]["status"] == 0
        assert node.events("worker_exited") == []


async def test_a_killed_worker_is_replaced(tmp_path: Path, redis_url: str) -> None:
    async with two_workers(tmp_path, redis_url) as node:
        victim = node.events("worker_started")[0]
        os.kill(int(victim["pid"]), signal.SIGKILL)
        with trio.fail_after(20):
            exited = await node.wait_log("worker_exited")
            replacement = await node.wait_log_count("worker_started", 3)
            await node.wait_log_count("listening", 3)
        assert exited["worker"] == victim["worker"] and exited["code"] == -signal.SIGKILL
        assert replacement["worker"] == victim["worker"] and replacement["generation"] == 2
        assert replacement["node"] != victim["node"], "a new generation, so old leases expire"
        client = await node.connect()  # the port still serves
        assert (await client.call("ping"))["ok"]
        node.signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await node.wait_exit(within=15) == 0


async def test_workers_leave_when_the_supervisor_is_killed(
    tmp_path: Path, redis_url: str
) -> None:
    async with two_workers(tmp_path, redis_url) as node:
        workers = {line["node"] for line in node.events("listening")}
        node.kill()  # the workers share its stderr pipe: their lines still arrive
        with trio.fail_after(15):
            await node.wait_log_count("supervisor_gone", 2)
            await node.wait_log_count("stopped", 2)
        assert {line["node"] for line in node.events("stopped")} == workers
