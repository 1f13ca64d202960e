"""Real `python -m apix_trio serve` processes for tests (a reusable harness).

`open_node(key_dir, name=..., redis_url=..., settings={...})` starts one node
as a child process on free ports (`server.ws_port = 0`, `server.http_port =
0`), reads its JSON log from stderr, waits for the `listening` line and
yields a `NodeProcess`: its ports, every log line so far, a token minter
(the development key pair in `key_dir`: nodes started on the same
`key_dir` verify each other's tokens), `connect()` for an authenticated
WebSocket client (`tests.memws.MemClient` over a real socket), `http_get()`
for the internal HTTP API, and `signal()` / `kill()` / `wait_exit()`.

Settings are passed the way operators pass them, as `APIX_<SECTION>_<KEY>`
environment variables (`{"server.shutdown_grace": 5}` ->
`APIX_SERVER_SHUTDOWN_GRACE=5`); the test's own `APIX_*` variables are not
inherited. A node still running when the block exits is killed (SIGKILL),
so a failing test leaves no process behind.

It is the harness `tests/test_shutdown.py` (`server_process`) and
`tests/test_resume_nodes.py` (`node_process`) each grew their own copy of:
`server_process(tmp_path, grace=g)` is `open_node(tmp_path / "keys",
settings={"server.shutdown_grace": g})`, and `assert_clean_log(server)` is
`node.problems() == [] and not node.tracebacks()`.

Resource handling: the process, its stderr pipe and the log reader task
belong to `open_node`; clients returned by `connect()` belong to the caller
(they die with the process anyway).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio
import trio.testing

from apix_trio.auth.devkeys import ensure_dev_keys, mint_token
from tests.memws import MemClient

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0
HTTP_MAX_RESPONSE = 1 << 20
ALL = (">",)


def settings_env(settings: Mapping[str, object]) -> dict[str, str]:
    """`{"section.key": value}` as `APIX_SECTION_KEY` variables (lists joined by commas)."""
    env: dict[str, str] = {}
    for name, value in settings.items():
        section, _, key = name.partition(".")
        assert key, f"settings are named section.key, not {name!r}"
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, list | tuple):
            text = ",".join(str(item) for item in value)
        else:
            text = str(value)
        env[f"APIX_{section.upper()}_{key.upper()}"] = text
    return env


@attrs.define(eq=False)
class NodeProcess:
    """One running `apix-trio serve` child process (see the module docstring)."""

    name: str
    process: trio.Process
    key_path: Path
    ws_port: int = 0
    http_port: int = 0
    lines: list[dict[str, Any]] = attrs.Factory(list)
    """Every JSON log line so far, in order."""
    raw: list[bytes] = attrs.Factory(list)
    """Every stderr line, JSON or not (tracebacks end up here)."""
    _waiters: dict[str, trio.Event] = attrs.Factory(dict)

    # -- the log -----------------------------------------------------------------

    def events(self, name: str) -> list[dict[str, Any]]:
        """The log lines with `event == name`."""
        return [line for line in self.lines if line.get("event") == name]

    def problems(self) -> list[dict[str, Any]]:
        """Log lines at level error or critical."""
        return [line for line in self.lines if line.get("level") in ("error", "critical")]

    def tracebacks(self) -> str:
        text = b"\n".join(self.raw).decode(errors="replace")
        return text if "Traceback" in text else ""

    async def wait_log(self, name: str) -> dict[str, Any]:
        """The first log line with `event == name`, once it is there."""
        while not self.events(name):
            await self._waiters.setdefault(name, trio.Event()).wait()
        return self.events(name)[0]

    async def wait_log_count(self, name: str, count: int) -> dict[str, Any]:
        """The `count`-th log line with `event == name`, once it is there."""
        while len(self.events(name)) < count:
            await self._waiters.setdefault(name, trio.Event()).wait()
        return self.events(name)[count - 1]

    def _seen(self, line: dict[str, Any]) -> None:
        self.lines.append(line)
        waiter = self._waiters.pop(str(line.get("event")), None)
        if waiter is not None:
            waiter.set()

    # -- the process -------------------------------------------------------------

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL (a crash: no goodbye to anyone)."""
        if self.process.returncode is None:
            self.process.kill()

    async def wait_exit(self, within: float) -> int:
        """The exit status; TooSlowError unless the process exits `within` seconds."""
        with trio.fail_after(within):
            return await self.process.wait()

    # -- clients -----------------------------------------------------------------

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/ws"

    def token(
        self,
        sub: str = "alice",
        *,
        org: str = "acme",
        pub: Iterable[str] = ALL,
        subs: Iterable[str] = ALL,
        **extra: Any,
    ) -> str:
        """A development token, valid on every node sharing this key dir."""
        return mint_token(self.key_path, org=org, sub=sub, pub=pub, sub_patterns=subs, **extra)

    async def open_client(self, *, rcvbuf: int | None = None) -> MemClient:
        """A WebSocket client after the handshake, not yet authenticated."""
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", self.ws_port))
        client = MemClient(trio.SocketStream(sock))
        await client.handshake([])
        return client

    async def connect(
        self,
        token: str | None = None,
        *,
        org: str = "acme",
        sub: str = "alice",
        rcvbuf: int | None = None,
    ) -> MemClient:
        """An authenticated client (`token`, or one for `org`/`sub` allowed everything)."""
        client = await self.open_client(rcvbuf=rcvbuf)
        reply = await client.call("auth", token=token or self.token(sub, org=org))
        assert reply["ok"], reply
        return client

    async def http_get(self, path: str) -> tuple[int, Any]:
        """`GET path` on the internal HTTP API: (status, decoded JSON body or None)."""
        stream = await trio.open_tcp_stream("127.0.0.1", self.http_port)
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        try:
            await stream.send_all(request.encode())
            data = b""
            while len(data) < HTTP_MAX_RESPONSE:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
                head, sep, body = data.partition(b"\r\n\r\n")
                length = _content_length(head) if sep else None
                if length is not None and len(body) >= length:
                    break
        finally:
            await stream.aclose()
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return status, (orjson.loads(body) if body else None)


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


async def call_keeping(
    client: MemClient, op: str, pushes: list[dict[str, Any]], **fields: Any
) -> dict[str, Any]:
    """Like `MemClient.call`, but the pushes that arrive before the reply
    (a replay, live events) are appended to `pushes` instead of dropped."""
    client._next_id += 1
    frame_id = client._next_id
    await client.send({"op": op, "id": frame_id, **fields})
    while True:
        frame = await client.recv()
        assert frame is not None, f"closed with {client.close_code} while waiting for {op}"
        if frame.get("id") == frame_id:
            return frame
        if "push" in frame:
            pushes.append(frame)


async def _read_log(node: NodeProcess) -> None:
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
                continue  # a traceback, say: kept in `raw`
            if isinstance(line, dict):
                node._seen(line)


@asynccontextmanager
async def open_node(
    key_dir: Path,
    *,
    name: str = "node",
    redis_url: str = "",
    settings: Mapping[str, object] | None = None,
    config_file: Path | None = None,
    start_timeout: float = START_TIMEOUT,
) -> AsyncIterator[NodeProcess]:
    """Run `python -m apix_trio serve` until the block exits (see the module docstring).

    Error handling: TooSlowError when no `listening` line comes within
    `start_timeout`; AssertionError (with the node's stderr) when the
    process exits before listening.
    """
    private, _public, _created = ensure_dev_keys(key_dir)
    env = {key: value for key, value in os.environ.items() if not key.startswith("APIX_")}
    env.update(
        APIX_SERVER_WS_PORT="0",
        APIX_SERVER_HTTP_PORT="0",
        APIX_SERVER_NODE_ID=name,
        APIX_AUTH_DEV_KEY_DIR=str(key_dir),
        APIX_LOG_LEVEL="info",
        APIX_LOG_FORMAT="json",
        PYTHONPATH=str(REPO),
    )
    if redis_url:
        env["APIX_BROKER_REDIS_URL"] = redis_url
    if config_file is not None:  # TOML-only settings ([[namespaces]])
        env["APIX_CONFIG"] = str(config_file)
    env.update(settings_env(settings or {}))
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "apix_trio", "serve"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        cwd=str(REPO),
    )
    node = NodeProcess(name, process, Path(private))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_log, node)
            with trio.fail_after(start_timeout):
                async with trio.open_nursery() as waiting:
                    waiting.start_soon(_fail_on_exit, node, waiting.cancel_scope)
                    listening = await node.wait_log("listening")
                    waiting.cancel_scope.cancel()
            node.ws_port = int(listening["ws_port"])
            node.http_port = int(listening["http_port"])
            yield node
            nursery.cancel_scope.cancel()
    finally:
        node.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


async def _fail_on_exit(node: NodeProcess, waiting: trio.CancelScope) -> None:
    status = await node.process.wait()
    if not waiting.cancel_called:
        stderr = b"\n".join(node.raw).decode(errors="replace")
        raise AssertionError(f"{node.name} exited with {status} before listening:\n{stderr}")


def assert_clean_log(node: NodeProcess) -> None:
    """No error or critical log line, no traceback on stderr."""
    assert not node.problems(), node.problems()
    assert not node.tracebacks(), node.tracebacks()


async def wait_exit_logged(node: NodeProcess, within: float) -> int:
    """`node.wait_exit(within)`, then until the log reader has taken every
    line the process wrote: its stderr is at EOF once it exited, so the
    reader runs to the end before every task is blocked again (`open_node`
    stops the reader when the block exits, maybe before the last lines)."""
    code = await node.wait_exit(within)
    await trio.testing.wait_all_tasks_blocked()
    return code
