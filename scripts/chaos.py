#!/usr/bin/env python3
"""A fault campaign: real nodes, real Redis, real clients, random faults, then
an audit of everything that was acknowledged.

    python3 scripts/chaos.py --duration 600                 # 10 minutes, standalone Redis (AOF)
    python3 scripts/chaos.py --mode sentinel --duration 600
    python3 scripts/chaos.py --mode cluster --duration 600

What runs (all on loopback, all started and stopped by this script):

- Redis: `standalone` (one redis-server, AOF with `appendfsync always`, so a
  SIGKILL loses nothing it acknowledged), `sentinel` (master, replica, three
  sentinels; `broker.publish_wait_replicas = 1`) or `cluster` (3 masters with
  a replica each; `publish_wait_replicas = 1`).
- `--nodes` (3) `apix-trio serve` processes on fixed ports, behind a small TCP
  load balancer inside this script, which sends each new connection to a
  running node (as a real one would: it cannot tell a paused node).
- `--clients` reconnecting clients (`apix_trio.clients.reconnect`), each
  subscribed with `since="0"` to 1-3 of `--channels` channels; `--publishers`
  publishers with idempotency keys that retry on `unavailable` or a lost
  connection with the same key until acknowledged; `--group-members`
  consumer-group members acking every job a job publisher sends; and
  `--state-writers` writers doing compare-and-set increments, each on its own
  state key.
- Faults, one every 1.5-4 s (seeded): SIGKILL and restart a node; SIGSTOP and
  SIGCONT a node; kill a Redis server (standalone: the master, restarted at
  once; sentinel and cluster: a master, whose replica takes over, or one
  time in three a replica; the victim stays down until the next fault, then
  comes back as a replica; a master whose replica is not in sync, so that
  no replica could take over without discarding acknowledged writes, is
  restarted at once instead); pause a Redis server (SIGSTOP/SIGCONT); drop
  a client's TCP connection at the balancer. Each fault is logged with its
  target and wall-clock time, to line up with the node and Redis logs.

At the end, with every fault healed, it waits for the system to quiesce and
checks:

1. every acknowledged publish is in its channel's history;
2. every subscriber received every acknowledged event of each of its
   channels, in id order, exactly once, unless it was told `recovered: false`
   (a `Resync`) for that channel; nothing it received is missing from history;
3. every job of the group was acked exactly once or dead-lettered (never both,
   never neither);
4. every CAS counter equals its writer's number of successful increments.

It prints the counts (faults by kind, events acknowledged, deliveries,
resyncs, violations) as JSON and exits 1 on any violation, 2 when the set-up
itself failed. Every loop is bounded by `--duration` and the quiesce timeout.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchlib import free_port  # noqa: E402

from apix_trio.auth.devkeys import ensure_dev_keys, mint_token  # noqa: E402
from apix_trio.clients.client import ApixClosed, ApixError, open_client  # noqa: E402
from apix_trio.clients.reconnect import (  # noqa: E402
    Resync,
    SubscriptionFailed,
    open_reconnecting_client,
)
from apix_trio.protocol.ids import parse_id  # noqa: E402

ORG = "chaos"
GROUP = "workers"
JOBS = "chaos.jobs"
RETRY_PAUSE = 0.2
CALL_TIMEOUT = 10.0


def log(message: str, **fields: Any) -> None:
    """One JSON line: `t` (monotonic s) and `ts` (UTC, to line up with the logs)."""
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    line = {"t": round(time.monotonic(), 2), "ts": now, "msg": message, **fields}
    print(json.dumps(line), flush=True)


# ------------------------------------------------------------------ Redis ----


class StandaloneRedis:
    """One redis-server with AOF fsync on every write: a SIGKILL loses nothing."""

    wait_replicas = 0

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.root), "--logfile",
             str(self.root / "redis.log")],
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_port(self.port)

    def kill(self, rng: random.Random) -> str:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.start()
        return f"master {self.port}"

    def pause(self, rng: random.Random) -> str:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True
        return f"master {self.port}"

    def resume(self) -> None:
        if self.process is not None and self.paused:
            self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def heal(self) -> None:
        self.resume()

    def stop(self) -> None:
        self.resume()
        if self.process is not None:
            self.process.terminate()
            self.process.wait()


class TopologyRedis:
    """Sentinel or Cluster, from the tests' own fixtures (tests/redis_topologies.py)."""

    wait_replicas = 1

    def __init__(self, root: Path, mode: str) -> None:
        from tests.redis_topologies import RedisClusterSetup, RedisSentinelSetup

        self.mode = mode
        # Redis' own default validity factor (10), unlike the tests' 0: a
        # replica that was not in sync lately is never promoted (it would
        # discard acknowledged writes; docs/redis.md, "Cluster")
        self.setup: Any = (
            RedisSentinelSetup(root / "sentinel") if mode == "sentinel"
            else RedisClusterSetup(root / "cluster", replica_validity_factor=10)
        )  # fmt: skip
        self.killed: list[Any] = []
        self.paused: list[Any] = []

    @property
    def url(self) -> str:
        return str(self.setup.url)

    def start(self) -> None:
        self.setup.start()

    def kill(self, rng: random.Random) -> str:
        """SIGKILL a master or, one time in three, a replica. A master whose
        replica is in sync fails over (waited for) and stays down, like a
        killed replica, until the next fault (`heal`); one whose replica is
        not is restarted at once (see `kill_master`)."""
        self.heal()  # at most one server down at a time: the topology must survive
        masters = self._master_ports()
        replicas = [
            server for server in _servers(self.setup)
            if server.running and server.port not in masters
        ]  # fmt: skip
        if replicas and rng.random() < 1 / 3:
            victim = rng.choice(replicas)
            victim.kill()
            self.killed.append(victim)
            return f"replica {victim.port}"
        return self.kill_master(rng)

    def _master_ports(self) -> list[int]:
        if self.mode == "sentinel":
            return [self.setup.master_port()]
        return list(self.setup.master_ports())

    def kill_master(self, rng: random.Random) -> str:
        if self.mode == "sentinel":
            old = self.setup.master_port()
        else:
            old = rng.choice(self.setup.master_ports())
        victim = self.setup.server_on(old)
        if not self.setup.replica_in_sync(old):
            # No replica could take over without discarding acknowledged
            # writes (it is not in sync): the master crashes and is restarted
            # at once, as a supervisor would, before a failover is due.
            victim.kill()
            time.sleep(rng.uniform(0.2, 0.6))
            victim.start()
            return f"master {old} (restarted: no replica in sync)"
        victim.kill()
        self.setup.wait_failover(old)
        self.killed.append(victim)
        return f"master {old}"

    def pause(self, rng: random.Random) -> str:
        servers = [s for s in _servers(self.setup) if s.running]
        victim = rng.choice(servers)
        victim.pause()
        self.paused.append(victim)
        return f"port {victim.port}"

    def resume(self) -> None:
        for server in self.paused:
            server.resume()
        self.paused.clear()

    def heal(self) -> None:
        self.resume()
        for server in self.killed:
            server.start()  # comes back as a replica of the new master
        self.killed.clear()

    def stop(self) -> None:
        self.resume()
        self.setup.stop()


def _servers(setup: Any) -> list[Any]:
    return list(setup.servers) if hasattr(setup, "servers") else [setup.master, setup.replica]


def _wait_port(port: int, timeout: float = 15.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


# ------------------------------------------------------------------ nodes ----


class Node:
    """One `apix-trio serve` process on fixed ports (kept across restarts)."""

    def __init__(self, name: str, env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.ws_port = free_port()
        self.http_port = free_port()
        self.env = {**env, "APIX_SERVER_NODE_ID": name,
                    "APIX_SERVER_WS_PORT": str(self.ws_port),
                    "APIX_SERVER_HTTP_PORT": str(self.http_port)}  # fmt: skip
        self.logs = logs
        self.process: trio.Process | None = None
        self.paused = False
        self.generation = 0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        self.generation += 1
        log_file = _log_file(self.logs / f"{self.name}.{self.generation}.log")
        self.process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "apix_trio", "serve"],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=self.env, cwd=REPO,
        )  # fmt: skip
        log_file.close()
        with trio.fail_after(20):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.ws_port)
                    await stream.aclose()
                    return
                except OSError:
                    await trio.sleep(0.05)

    async def kill(self) -> None:
        if self.process is not None and self.running:
            self.resume()
            self.process.kill()
            await self.process.wait()

    def pause(self) -> None:
        if self.process is not None and self.running:
            self.process.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.process is not None and self.paused and self.running:
            self.process.send_signal(signal.SIGCONT)
        self.paused = False

    async def stop(self) -> None:
        self.resume()
        if self.process is not None and self.running:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(15):
                await self.process.wait()
            await self.kill()


def _log_file(path: Path) -> IO[bytes]:
    return path.open("wb")


class Balancer:
    """A TCP load balancer: each new connection goes to the next running node.

    `drop_one()` aborts a random live client connection at both ends (what a
    broken network path looks like to both peers).
    """

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.port = free_port()
        self.pairs: set[tuple[trio.SocketStream, trio.SocketStream]] = set()
        self._next = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        upstream = None
        for _ in range(len(self.nodes)):
            node = self.nodes[self._next % len(self.nodes)]
            self._next += 1
            if not node.running:
                continue
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", node.ws_port)
                break
            except OSError:
                continue
        if upstream is None:
            await client.aclose()
            return
        pair = (client, upstream)
        self.pairs.add(pair)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pipe, client, upstream, nursery.cancel_scope)
                nursery.start_soon(_pipe, upstream, client, nursery.cancel_scope)
        finally:
            self.pairs.discard(pair)
            for stream in pair:
                await trio.aclose_forcefully(stream)

    def drop_one(self, rng: random.Random) -> bool:
        if not self.pairs:
            return False
        client, upstream = rng.choice(sorted(self.pairs, key=id))
        for stream in (client, upstream):
            # RST rather than FIN: the peers see a broken path, not a goodbye.
            stream.socket.setsockopt(
                trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            stream.socket.close()
        return True


async def _pipe(source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope) -> None:
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        done.cancel()


# ------------------------------------------------------------- workloads ----


class Ledger:
    """What the workloads saw, for the final audit."""

    def __init__(self) -> None:
        self.acked: dict[str, dict[str, str]] = defaultdict(dict)  # channel -> key -> id
        self.received: dict[tuple[int, str], list[str]] = defaultdict(list)
        self.resynced: set[tuple[int, str]] = set()
        self.details: list[dict[str, Any]] = []
        self.subscriptions: dict[int, list[str]] = {}
        self.job_acks: Counter[str] = Counter()
        self.jobs: dict[str, str] = {}  # key -> id
        self.cas_successes: dict[str, int] = {}
        self.retries = 0
        self.gave_up = 0
        self.subscription_failures = 0
        self.clients_expected = 0
        self.clients_ready = trio.Event()

    def client_subscribed(self) -> None:
        if len(self.subscriptions) >= self.clients_expected:
            self.clients_ready.set()


async def call_retrying(
    client: Any, ledger: Ledger, op: str, stop_at: float, **fields: Any
) -> dict[str, Any] | None:
    """`op` until it gets an answer other than `unavailable`/a lost connection;
    None when `stop_at` (trio time) passed first."""
    while trio.current_time() < stop_at:
        try:
            with trio.fail_after(CALL_TIMEOUT):
                result: dict[str, Any] = await client.call(op, **fields)
                return result
        except ApixError as exc:
            if exc.code in ("unavailable", "rate_limited", "internal"):
                ledger.retries += 1
                await trio.sleep(RETRY_PAUSE)
                continue
            raise
        except (ApixClosed, trio.TooSlowError):
            ledger.retries += 1
            await trio.sleep(RETRY_PAUSE)
    ledger.gave_up += 1
    return None


async def subscriber(
    index: int, channels: list[str], url: str, token: Callable[[], str], ledger: Ledger,
    stop: trio.Event,
) -> None:  # fmt: skip
    async with open_reconnecting_client(url, token, backoff_base=0.2, backoff_cap=2.0) as client:
        await client.wait_connected()
        for channel in channels:
            await client.subscribe(channel, since="0")
        ledger.subscriptions[index] = channels
        ledger.client_subscribed()
        events = client.events()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on, stop, nursery.cancel_scope)
            async for item in events:
                if isinstance(item, Resync):
                    ledger.resynced.add((index, item.channel))
                elif isinstance(item, SubscriptionFailed):
                    ledger.subscription_failures += 1
                elif item.get("push") == "event":
                    ledger.received[(index, item["channel"])].append(item["event"]["id"])


async def _stop_on(stop: trio.Event, scope: trio.CancelScope) -> None:
    await stop.wait()
    scope.cancel()


async def publisher(
    index: int, channels: list[str], url: str, token: Callable[[], str], ledger: Ledger,
    until: float, rate: float, rng: random.Random,
) -> None:  # fmt: skip
    async with open_reconnecting_client(url, token, backoff_base=0.2, backoff_cap=2.0) as client:
        n = 0
        while trio.current_time() < until:
            n += 1
            channel = rng.choice(channels)
            key = f"p{index}-{n}"
            result = await call_retrying(
                client, ledger, "publish", until + 60, channel=channel, data={"n": n}, key=key
            )
            if result is not None:
                ledger.acked[channel][key] = result["id"]
            await trio.sleep(1 / rate)


async def job_publisher(
    url: str, token: Callable[[], str], ledger: Ledger, until: float, rate: float
) -> None:
    async with open_reconnecting_client(url, token, backoff_base=0.2, backoff_cap=2.0) as client:
        n = 0
        while trio.current_time() < until:
            n += 1
            key = f"job-{n}"
            result = await call_retrying(
                client, ledger, "publish", until + 60, channel=JOBS, data={"job": n}, key=key
            )
            if result is not None:
                ledger.jobs[key] = result["id"]
            await trio.sleep(1 / rate)


async def group_member(
    url: str, token: Callable[[], str], ledger: Ledger, stop: trio.Event
) -> None:
    async with open_reconnecting_client(url, token, backoff_base=0.2, backoff_cap=2.0) as client:
        await client.wait_connected()
        await client.subscribe(JOBS, group=GROUP)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on, stop, nursery.cancel_scope)
            async for item in client.events():
                if isinstance(item, dict) and item.get("group") == GROUP:
                    event_id = item["event"]["id"]
                    try:
                        with trio.fail_after(CALL_TIMEOUT):
                            reply = await client.call(
                                "ack", channel=JOBS, group=GROUP, ids=[event_id]
                            )
                        ledger.job_acks[event_id] += int(reply.get("acked", 0))
                    except (ApixError, ApixClosed, trio.TooSlowError):
                        pass  # not acked: it comes again (at-least-once)


async def cas_writer(
    key: str, url: str, token: Callable[[], str], ledger: Ledger, until: float
) -> None:
    """Increment `key` by compare-and-set; it is this writer's alone, so after an
    uncertain answer (unavailable, lost connection) a re-read tells whether the
    set took effect."""
    ledger.cas_successes[key] = 0
    async with open_reconnecting_client(url, token, backoff_base=0.2, backoff_cap=2.0) as client:
        while trio.current_time() < until:
            current = await call_retrying(client, ledger, "state.get", until + 60, key=key)
            if current is None:
                return
            version, value = current["version"], current["value"] or 0
            try:
                with trio.fail_after(CALL_TIMEOUT):
                    await client.call("state.set", key=key, value=value + 1, version=version)
                ledger.cas_successes[key] += 1
            except ApixError as exc:
                if exc.code == "conflict":
                    raise AssertionError(f"{key}: conflict with a single writer") from exc
                await _settle_uncertain(client, ledger, key, version, value, until)
            except (ApixClosed, trio.TooSlowError):
                await _settle_uncertain(client, ledger, key, version, value, until)
            await trio.sleep(0.05)


async def _settle_uncertain(
    client: Any, ledger: Ledger, key: str, version: int, value: int, until: float
) -> None:
    ledger.retries += 1
    after = await call_retrying(client, ledger, "state.get", until + 60, key=key)
    if after is not None and after["version"] == version + 1 and after["value"] == value + 1:
        ledger.cas_successes[key] += 1


# ----------------------------------------------------------------- faults ----


async def inject_faults(
    nodes: list[Node], redis: Any, balancer: Balancer, until: float, rng: random.Random,
    kinds: list[str], counts: Counter[str],
) -> None:  # fmt: skip
    order: list[str] = []
    while trio.current_time() < until:
        await trio.sleep(rng.uniform(1.5, 4.0))
        # a killed Redis server comes back (as a replica) before the next fault
        await trio.to_thread.run_sync(redis.heal)
        if not order:  # every kind once per round, in a random order
            order = rng.sample(kinds, len(kinds))
        kind = order.pop()
        target = ""
        if kind == "node_kill":
            node = rng.choice([n for n in nodes if n.running])
            target = node.name
            await node.kill()
            await trio.sleep(rng.uniform(0.5, 2.0))
            await node.start()
        elif kind == "node_pause":
            node = rng.choice([n for n in nodes if n.running])
            target = node.name
            node.pause()
            await trio.sleep(rng.uniform(0.5, 3.0))
            node.resume()
        elif kind == "redis_kill":
            log("fault_start", kind=kind)
            target = await trio.to_thread.run_sync(redis.kill, rng)
        elif kind == "redis_pause":
            target = await trio.to_thread.run_sync(redis.pause, rng)
            log("fault_start", kind=kind, target=target)
            await trio.sleep(rng.uniform(0.5, 2.0))
            await trio.to_thread.run_sync(redis.resume)
        elif kind == "client_drop":
            if not balancer.drop_one(rng):
                continue
        counts[kind] += 1
        log("fault", kind=kind, target=target)
    await trio.to_thread.run_sync(redis.heal)


# ------------------------------------------------------------------ audit ----


async def read_all(url: str, token: str, channel: str) -> list[dict[str, Any]]:
    """Every retained event of `channel`, oldest first."""
    events: list[dict[str, Any]] = []
    async with open_client(url, token) as client:
        since = "0"
        while True:
            page = await client.call("history", channel=channel, since=since, limit=1000)
            events.extend(page["events"])
            if len(page["events"]) < 1000:
                return events
            since = page["events"][-1]["id"]


async def audit(
    url: str, token: str, ledger: Ledger, channels: list[str]
) -> tuple[dict[str, int], list[str]]:
    violations: list[str] = []
    history: dict[str, list[str]] = {}
    for channel in channels:
        history[channel] = [event["id"] for event in await read_all(url, token, channel)]
        stored = set(history[channel])
        for key, event_id in ledger.acked[channel].items():
            if event_id not in stored:
                violations.append(f"{channel}: acknowledged {event_id} ({key}) not in history")
    deliveries = 0
    for index, subscribed in ledger.subscriptions.items():
        for channel in subscribed:
            got = ledger.received[(index, channel)]
            deliveries += len(got)
            if (index, channel) in ledger.resynced:
                continue
            parsed = [parse_id(event_id) for event_id in got]
            if any(b <= a for a, b in itertools.pairwise(parsed)):
                violations.append(f"client {index} {channel}: out of order or duplicated")
            missing = set(ledger.acked[channel].values()) - set(got)
            unknown = set(got) - set(history[channel])
            if missing or unknown:
                ledger.details.append(
                    {"client": index, "channel": channel, "received": got,
                     "missing": sorted(missing), "unknown": sorted(unknown),
                     "history": history[channel]}
                )  # fmt: skip
            if missing:
                violations.append(
                    f"client {index} {channel}: {len(missing)} acknowledged events never "
                    f"delivered (e.g. {sorted(missing)[0]})"
                )
            if unknown:
                violations.append(f"client {index} {channel}: received ids not in history")
    letters = await read_all(url, token, JOBS + ".dlq")
    dead = Counter(letter["data"]["event"]["id"] for letter in letters)
    for key, event_id in ledger.jobs.items():
        outcome = ledger.job_acks[event_id] + dead[event_id]
        if outcome != 1:
            violations.append(
                f"job {key} {event_id}: acked {ledger.job_acks[event_id]}x, "
                f"dead-lettered {dead[event_id]}x"
            )
    async with open_client(url, token) as client:
        for key, successes in ledger.cas_successes.items():
            state = await client.call("state.get", key=key)
            if (state["value"] or 0) != successes:
                violations.append(f"{key}: value {state['value']} after {successes} increments")
    figures = {
        "events_acknowledged": sum(len(keys) for keys in ledger.acked.values()),
        "deliveries": deliveries,
        "resyncs": len(ledger.resynced),
        "jobs": len(ledger.jobs),
        "jobs_dead_lettered": sum(1 for event_id in ledger.jobs.values() if dead[event_id]),
        "cas_increments": sum(ledger.cas_successes.values()),
        "retries": ledger.retries,
        "gave_up": ledger.gave_up,
        "subscription_failures": ledger.subscription_failures,
    }
    return figures, violations


async def quiesce(ledger: Ledger, within: float) -> None:
    """Until every subscriber has every acknowledged event of its channels (or
    was told to resync), or `timeout` seconds passed (the audit then says what
    is missing)."""
    with trio.move_on_after(within):
        while True:
            behind = 0
            for index, subscribed in ledger.subscriptions.items():
                for channel in subscribed:
                    if (index, channel) in ledger.resynced:
                        continue
                    if set(ledger.acked[channel].values()) - set(ledger.received[(index, channel)]):
                        behind += 1
            if not behind:
                return
            await trio.sleep(0.25)


# ------------------------------------------------------------------- main ----


@asynccontextmanager
async def running(args: argparse.Namespace, root: Path) -> AsyncIterator[tuple[list[Node], Any]]:
    redis: Any = (
        StandaloneRedis(root) if args.mode == "standalone" else TopologyRedis(root, args.mode)
    )
    await trio.to_thread.run_sync(redis.start)
    keys = root / "keys"
    ensure_dev_keys(keys)
    env = {k: v for k, v in os.environ.items() if not k.startswith("APIX_")}
    env.update(
        APIX_BROKER_REDIS_URL=redis.url,
        APIX_BROKER_PUBLISH_WAIT_REPLICAS=str(redis.wait_replicas),
        APIX_AUTH_DEV_KEY_DIR=str(keys),
        APIX_HEARTBEAT_INTERVAL="5",
        APIX_HEARTBEAT_TIMEOUT="3",
        APIX_DELIVERY_VISIBILITY_TIMEOUT="5",
        APIX_DELIVERY_RETRY_BASE="0.5",
        APIX_DELIVERY_RETRY_MAX="2",
        APIX_DEFAULTS_HISTORY_SIZE="1000000",
        APIX_LIMITS_OPS_PER_SECOND="1000",
        APIX_LOG_LEVEL="warning",
        PYTHONPATH=str(REPO),
    )
    if args.mode == "sentinel":
        env.update(APIX_BROKER_REDIS_MODE="sentinel", APIX_BROKER_SENTINEL_MASTER="mymaster")
    elif args.mode == "cluster":
        env.update(APIX_BROKER_REDIS_MODE="cluster")
    logs = root / "logs"
    logs.mkdir()
    nodes = [Node(f"chaos{i}", env, logs) for i in range(args.nodes)]
    try:
        for node in nodes:
            await node.start()
        yield nodes, redis
    finally:
        with trio.CancelScope(shield=True):
            for node in nodes:
                await node.stop()
            await trio.to_thread.run_sync(redis.stop)


async def campaign(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="apix-chaos-"))
    kinds = ["node_kill", "node_pause", "redis_kill", "redis_pause", "client_drop"]
    counts: Counter[str] = Counter()
    ledger = Ledger()
    run = f"r{rng.randrange(1 << 30):x}"
    channels = [f"chaos.{run}.c{i}" for i in range(args.channels)]
    try:
        async with running(args, root) as (nodes, redis):
            private = str(root / "keys" / "dev.key")

            def token() -> str:
                return mint_token(private, org=ORG, sub="chaos", pub=[">"], sub_patterns=[">"],
                                  state=[">"], ttl=24 * 3600)  # fmt: skip

            balancer = Balancer(nodes)
            url = f"ws://127.0.0.1:{balancer.port}/ws"
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                await nursery.start(balancer.serve)
                ledger.clients_expected = args.clients
                if not args.clients:
                    ledger.clients_ready.set()
                async with trio.open_nursery() as consumers:
                    for index in range(args.clients):
                        mine = rng.sample(channels, rng.randint(1, min(3, len(channels))))
                        consumers.start_soon(subscriber, index, mine, url, token, ledger, stop)
                    for _ in range(args.group_members):
                        consumers.start_soon(group_member, url, token, ledger, stop)
                    with trio.fail_after(60):
                        await ledger.clients_ready.wait()
                    log("clients_ready", clients=args.clients)
                    until = trio.current_time() + args.duration
                    async with trio.open_nursery() as producers:
                        for index in range(args.publishers):
                            producers.start_soon(
                                publisher, index, channels, url, token, ledger, until, args.rate,
                                random.Random(rng.random()),
                            )  # fmt: skip
                        producers.start_soon(job_publisher, url, token, ledger, until, args.rate)
                        for index in range(args.state_writers):
                            producers.start_soon(
                                cas_writer, f"chaos.{run}.counter{index}", url, token, ledger, until
                            )
                        producers.start_soon(
                            inject_faults, nodes, redis, balancer, until, rng, kinds, counts
                        )
                    log("load_done")
                    for node in nodes:
                        if not node.running:
                            await node.start()
                        node.resume()
                    await quiesce(ledger, args.quiesce)
                    # Group jobs: redelivery and dead-lettering need retry_max x attempts.
                    await trio.sleep(args.group_settle)
                    stop.set()
                figures, violations = await audit(url, token(), ledger, channels)
                nursery.cancel_scope.cancel()
    except Exception as exc:
        log("setup_failed", error=repr(exc))
        return 2
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    summary = {
        "mode": args.mode,
        "duration_s": args.duration,
        "nodes": args.nodes,
        "clients": args.clients,
        "faults": dict(counts),
        **figures,
        "violations": len(violations),
        "violations_by_kind": dict(Counter(_kind(v) for v in violations)),
        "violation_samples": violations[:20],
    }
    if args.keep:
        details = root / "audit.json"
        details.write_text(json.dumps({"violations": violations, "subscribers": ledger.details}))
        summary["audit_details"] = str(details)
    print(json.dumps(summary, indent=2))
    return 1 if violations else 0


def _kind(violation: str) -> str:
    """A violation's kind: its text without the client, channel and ids."""
    for kind in ("not in history", "never delivered", "out of order", "acked", "increments"):
        if kind in violation:
            prefix = "acknowledged " if violation.startswith("chaos.") else ""
            return prefix + kind
    return violation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mode", choices=["standalone", "sentinel", "cluster"], default="standalone"
    )
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load and faults")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--channels", type=int, default=10)
    parser.add_argument("--publishers", type=int, default=20)
    parser.add_argument("--rate", type=float, default=5.0, help="publishes/s per publisher")
    parser.add_argument("--group-members", type=int, default=6)
    parser.add_argument("--state-writers", type=int, default=4)
    parser.add_argument("--quiesce", type=float, default=60.0)
    parser.add_argument("--group-settle", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the logs directory")
    args = parser.parse_args(argv)
    return trio.run(campaign, args)


if __name__ == "__main__":
    sys.exit(main())
