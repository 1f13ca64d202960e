"""Redis Cluster and Sentinel set-ups that the tests start themselves.

Both are built from `tests.conftest.RedisServer` processes on free ports, in
temporary directories, and torn down by their fixtures:

- `RedisClusterSetup`: `masters` x 2 servers with `--cluster-enabled yes`, joined
  by `redis-cli --cluster create ... --cluster-replicas 1` (each master gets one
  replica), a short `cluster-node-timeout` so that a failover takes seconds.
  `url` names one node (as `broker.redis_url` does in cluster mode);
  `kill_master(port)` SIGKILLs a master and `wait_failover` waits until its
  replica took its slots over.
- `RedisSentinelSetup`: one master, one replica and three sentinels watching
  the master as `mymaster` (quorum 2). `url` lists the sentinels
  (`redis://h1:p1,h2:p2,h3:p3`, as `broker.redis_url` does in sentinel mode);
  `kill_master()` SIGKILLs the master and `wait_failover` waits until the
  sentinels name the old replica as master.

Everything here talks to its servers over plain sockets with inline commands
(no client library), so the fixtures test nothing of the broker's own client.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tests.conftest import REDIS_SERVER, RedisServer, free_port

REDIS_CLI = str(Path(REDIS_SERVER).with_name("redis-cli"))
NODE_TIMEOUT_MS = 1000
FORM_TIMEOUT = 30.0


class _Incomplete(Exception):
    pass


def _parse(data: bytes, pos: int = 0) -> tuple[object, int]:
    """One RESP2 value from `data` at `pos`: (value, next position).
    Errors come back as `RuntimeError` instances, bulk strings as text."""
    end = data.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind, line = data[pos : pos + 1], data[pos + 1 : end].decode()
    after = end + 2
    if kind == b"+":
        return line, after
    if kind == b"-":
        return RuntimeError(line), after
    if kind == b":":
        return int(line), after
    if kind == b"$":
        length = int(line)
        if length < 0:
            return None, after
        if len(data) < after + length + 2:
            raise _Incomplete
        return data[after : after + length].decode(errors="replace"), after + length + 2
    if kind == b"*":
        count = int(line)
        items = []
        for _ in range(max(count, 0)):
            item, after = _parse(data, after)
            items.append(item)
        return (items if count >= 0 else None), after
    raise ValueError(f"not RESP: {data[pos:pos + 20]!r}")


def command(port: int, *words: str, timeout: float = 2.0) -> object:
    """Send one command (as a RESP array), return its parsed reply."""
    payload = b"*%d\r\n" % len(words) + b"".join(
        b"$%d\r\n%s\r\n" % (len(w.encode()), w.encode()) for w in words
    )
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"redis on {port} closed the connection")
            data += chunk
            try:
                return _parse(data)[0]
            except _Incomplete:
                continue


def info_field(port: int, section: str, field: str) -> str:
    text = str(command(port, "INFO", section))
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return ""


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():  # type: ignore[operator]
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


CLUSTER_BUS_OFFSET = 10000
"""A cluster node also listens on its port + 10000 (the cluster bus)."""


def cluster_port() -> int:
    """A free port that a cluster node can use: at most 55535, its bus port free too."""
    for _ in range(1000):
        port = free_port()
        if port + CLUSTER_BUS_OFFSET > 65535:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisClusterSetup:
    """A Redis Cluster of `masters` masters with one replica each."""

    def __init__(
        self, root: Path, *, masters: int = 3, replica_validity_factor: int = 0
    ) -> None:
        """`replica_validity_factor` 0 (the tests): a replica takes over
        however long it was cut off, so every failover a test provokes
        happens; Redis' default 10 refuses a replica that has not been in
        sync lately, which is what keeps acknowledged writes (the fault
        campaign uses it, docs/redis.md "Cluster")."""
        self.servers: list[RedisServer] = []
        for n in range(masters * 2):
            directory = root / f"node{n}"
            directory.mkdir(parents=True)
            self.servers.append(
                RedisServer(
                    directory,
                    appendonly=True,
                    args=(
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                        "--cluster-replica-validity-factor", str(replica_validity_factor),
                    ),
                )
            )  # fmt: skip
            self.servers[-1].port = cluster_port()
        self.masters = masters

    def start(self) -> None:
        for server in self.servers:
            server.start()
        addresses = [f"127.0.0.1:{server.port}" for server in self.servers]
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *addresses, "--cluster-replicas", "1",
             "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=FORM_TIMEOUT,
        )  # fmt: skip
        wait_until(self._formed, FORM_TIMEOUT, "the cluster to report state ok everywhere")

    def _formed(self) -> bool:
        return all(
            info_field(server.port, "cluster", "cluster_enabled") == "1"
            and "cluster_state:ok" in str(command(server.port, "CLUSTER", "INFO"))
            for server in self.servers
            if server.running
        ) and len(self.master_ports()) == self.masters

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    @property
    def url(self) -> str:
        return self.servers[0].url

    def master_ports(self) -> list[int]:
        """Ports of the running masters that own slots, as the cluster sees them now."""
        ports = []
        for server in self.servers:
            if server.running and info_field(server.port, "replication", "role") == "master":
                ports.append(server.port)
        return sorted(ports)

    def server_on(self, port: int) -> RedisServer:
        return next(server for server in self.servers if server.port == port)

    def kill_master(self, port: int) -> None:
        self.server_on(port).kill()

    def replica_in_sync(self, master_port: int) -> bool:
        """Whether a running replica of `master_port` has its link up."""
        return any(
            info_field(server.port, "replication", "master_port") == str(master_port)
            and info_field(server.port, "replication", "master_link_status") == "up"
            for server in self.servers
            if server.running and server.port != master_port
        )

    def wait_failover(self, dead_port: int, timeout: float = 30.0) -> None:
        """Until a replica replaced the dead master and the cluster is ok again."""
        alive = [s for s in self.servers if s.running and s.port != dead_port]

        def recovered() -> bool:
            masters = [s for s in alive if info_field(s.port, "replication", "role") == "master"]
            return len(masters) == self.masters and all(
                "cluster_state:ok" in str(command(s.port, "CLUSTER", "INFO")) for s in alive
            )

        wait_until(recovered, timeout, "a replica to take the dead master's slots")


SENTINEL_MASTER = "mymaster"


class RedisSentinelSetup:
    """One master, one replica, three sentinels (quorum 2)."""

    def __init__(self, root: Path, *, sentinels: int = 3) -> None:
        self.root = root
        master_dir = root / "master"
        master_dir.mkdir(parents=True)
        self.master = RedisServer(master_dir, appendonly=True)
        replica_dir = root / "replica"
        replica_dir.mkdir()
        self.replica = RedisServer(
            replica_dir, appendonly=True, args=("--replicaof", "127.0.0.1", str(self.master.port))
        )
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self._sentinels: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        wait_until(
            lambda: info_field(self.replica.port, "replication", "master_link_status") == "up",
            FORM_TIMEOUT,
            "the replica to sync",
        )
        for n, port in enumerate(self.sentinel_ports):
            directory = self.root / f"sentinel{n}"
            directory.mkdir()
            config = directory / "sentinel.conf"
            config.write_text(
                "\n".join(
                    [
                        f"port {port}",
                        "bind 127.0.0.1",
                        f"dir {directory}",
                        f"logfile {directory / 'sentinel.log'}",
                        f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {self.master.port} 2",
                        f"sentinel down-after-milliseconds {SENTINEL_MASTER} 1000",
                        f"sentinel failover-timeout {SENTINEL_MASTER} 5000",
                        f"sentinel parallel-syncs {SENTINEL_MASTER} 1",
                        "",
                    ]
                )
            )
            self._sentinels.append(
                subprocess.Popen(
                    [REDIS_SERVER, str(config), "--sentinel"], stdin=subprocess.DEVNULL
                )
            )
        for port in self.sentinel_ports:
            wait_until(
                lambda port=port: self._sentinel_sees_all(port),
                FORM_TIMEOUT,
                f"sentinel {port} to see the master, the replica and the other sentinels",
            )

    def _sentinel_sees_all(self, port: int) -> bool:
        reply = command(port, "SENTINEL", "MASTER", SENTINEL_MASTER)
        assert isinstance(reply, list)
        fields = dict(zip(reply[0::2], reply[1::2], strict=False))
        return (
            fields.get("num-slaves") == "1"
            and fields.get("num-other-sentinels") == str(len(self.sentinel_ports) - 1)
        )

    def stop(self) -> None:
        for process in self._sentinels:
            process.terminate()
        for process in self._sentinels:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._sentinels.clear()
        self.replica.stop()
        self.master.stop()

    @property
    def url(self) -> str:
        return "redis://" + ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def master_port(self) -> int:
        """The master's port as the first sentinel names it."""
        return _master_addr_port(self.sentinel_ports[0])

    def server_on(self, port: int) -> RedisServer:
        return self.master if self.master.port == port else self.replica

    def replica_in_sync(self, master_port: int) -> bool:
        """Whether the other server runs as a replica of `master_port` with its link up."""
        other = self.replica if self.master.port == master_port else self.master
        return (
            other.running
            and info_field(other.port, "replication", "master_port") == str(master_port)
            and info_field(other.port, "replication", "master_link_status") == "up"
        )

    def kill_master(self) -> RedisServer:
        """SIGKILL whichever server is master now; returns it."""
        port = self.master_port()
        victim = self.master if self.master.port == port else self.replica
        victim.kill()
        return victim

    def wait_failover(self, old_port: int, timeout: float = 30.0) -> int:
        """Until every sentinel names a new master; its port."""

        def moved() -> bool:
            return all(_master_addr_port(p) != old_port for p in self.sentinel_ports)

        wait_until(moved, timeout, "the sentinels to promote the replica")
        return self.master_port()


def _master_addr_port(sentinel_port: int) -> int:
    reply = command(sentinel_port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER)
    assert isinstance(reply, list), reply
    return int(reply[1])


def ports_of(servers: Sequence[RedisServer]) -> list[int]:
    return [server.port for server in servers]
