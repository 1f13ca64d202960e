"""Shared fixtures: real `redis-server` processes for the Redis tests.

Every Redis test gets its own server on a free port with its data in a
temporary directory; nothing ever touches a Redis the machine already runs.
The fixtures are synchronous (they only start and stop processes).

- `redis_server_factory(appendonly=False, args=())` starts a server and
  returns a `RedisServer` (stopped at teardown);
- `redis_server`: one server, no persistence;
- `redis_url`: the URL of `redis_server`.

`RedisServer` can `kill()` (SIGKILL), `restart()` (same port and directory:
with `appendonly=True` the data survives), `pause()` (SIGSTOP) and
`resume()` (SIGCONT).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
START_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int) -> bool:
    """True when the server on `port` answers PING with PONG (not LOADING)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process the tests own."""

    def __init__(
        self, directory: Path, *, appendonly: bool = False, args: Sequence[str] = ()
    ) -> None:
        self.directory = directory
        self.port = free_port()
        self.appendonly = appendonly
        self.args = tuple(args)
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self._process is not None, "the server is not running"
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        assert not self.running, "already running"
        command = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--dir", str(self.directory),
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.directory / "redis.log"),
            *self.args,
        ]  # fmt: skip
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not _ping(self.port):
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer: {self._log_tail()}")
            time.sleep(0.01)

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.directory / "redis.log").read_text()[-2000:]
        return "(no log)"

    def kill(self) -> None:
        """SIGKILL, as a crash would (the AOF keeps what was written)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None
            self._paused = False

    def restart(self) -> None:
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the socket stays open, nothing answers."""
        self._process_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        self._process_signal(signal.SIGCONT)
        self._paused = False

    def _process_signal(self, signum: int) -> None:
        assert self._process is not None, "the server is not running"
        self._process.send_signal(signum)

    def stop(self) -> None:
        if self._process is None:
            return
        if self._paused:
            self.resume()
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None


RedisServerFactory = Callable[..., RedisServer]


@pytest.fixture
def redis_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServerFactory]:
    servers: list[RedisServer] = []

    def start(*, appendonly: bool = False, args: Sequence[str] = ()) -> RedisServer:
        server = RedisServer(tmp_path_factory.mktemp("redis"), appendonly=appendonly, args=args)
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def redis_server(redis_server_factory: RedisServerFactory) -> RedisServer:
    return redis_server_factory()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[Any]:
    """A Redis Cluster of this test's own (3 masters, 3 replicas;
    tests/redis_topologies.py), for tests that kill or pause its servers."""
    from tests.redis_topologies import RedisClusterSetup  # it imports this module

    cluster = RedisClusterSetup(tmp_path / "cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_sentinel(tmp_path: Path) -> Iterator[Any]:
    """A Sentinel set-up of this test's own (master, replica, 3 sentinels;
    tests/redis_topologies.py)."""
    from tests.redis_topologies import RedisSentinelSetup  # it imports this module

    setup = RedisSentinelSetup(tmp_path / "sentinel")
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


@pytest.fixture(scope="session")
def shared_redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One Redis Cluster (3 masters, 3 replicas; tests/redis_topologies.py) for
    the whole session: the broker suites' `redis-cluster` parameter. Tests
    isolate themselves by key prefix; none may kill its nodes (a failover
    test starts a cluster of its own)."""
    from tests.redis_topologies import RedisClusterSetup  # it imports this module

    cluster = RedisClusterSetup(tmp_path_factory.mktemp("shared-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
