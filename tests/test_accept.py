"""The accept loop of a plain TCP listener (`server._serve_socket`).

It takes every connection waiting in the backlog per wake-up (up to
`ACCEPT_BATCH`, then a checkpoint): a backlog longer than a batch is served
in full; a connection that went away before accept(2) is skipped; an
overloaded system (EMFILE) is logged and retried, not fatal.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import pytest
import structlog.testing
import trio
import trio.testing

from apix_trio import server
from tests.memws import MemClient
from tests.serverkit import running_server

pytestmark = pytest.mark.timeout(60)


async def test_a_backlog_longer_than_a_batch_is_served(tmp_path):
    async with running_server(tmp_path) as kit:
        count = server.ACCEPT_BATCH * 2 + 5
        # Connected (the kernel completes the TCP handshake) without letting
        # the server run: they all wait in the backlog together.
        raw = [socket.create_connection(("127.0.0.1", kit.running.ws_port)) for _ in range(count)]
        clients = [MemClient(trio.SocketStream(trio.socket.from_stdlib_socket(s))) for s in raw]
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for client in clients:
                    nursery.start_soon(client.handshake, [])
            assert len(kit.hub.registry) == count
            for client in clients:
                await client.stream.aclose()
            while len(kit.hub.registry):
                await trio.testing.wait_all_tasks_blocked()


async def test_accept_errors(tmp_path, monkeypatch):
    """ECONNABORTED is skipped silently; EMFILE is logged, waited out, retried."""
    real_accept = socket.socket.accept
    errors = [errno.ECONNABORTED, errno.EMFILE]

    def accept(self: socket.socket) -> Any:
        if errors and self.getsockname()[1] == port:
            raise OSError(errors.pop(0), "injected")
        return real_accept(self)

    async with running_server(tmp_path) as kit:
        port = kit.running.ws_port
        monkeypatch.setattr(socket.socket, "accept", accept)
        with structlog.testing.capture_logs() as logs, trio.fail_after(30):
            sock = trio.socket.socket()
            await sock.connect(("127.0.0.1", port))
            client = MemClient(trio.SocketStream(sock))
            await client.handshake([])
        assert errors == []
        failures = [entry for entry in logs if entry["event"] == "accept_failed"]
        assert [entry["error"] for entry in failures] == ["EMFILE"]
        assert len(kit.hub.registry) == 1
        await client.stream.aclose()
