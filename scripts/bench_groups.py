"""Consumer-group throughput and redelivery latency, with Redis in the path.

Starts a throwaway redis-server (no persistence) on a free port and two
`python -m apix_trio serve` nodes (A and B) on it, then measures, from this
process (its clients are raw wsproto sockets on trio, one task per member):

1. backlog: the group exists, `--events` events are published (straight into
   Redis through the broker), then `--members` members join on node A and
   drain them, acking every batch they read (one `ack` op per socket read,
   not waiting for its reply). Reported: acked events/s from the first join
   to the last ack, and node A's CPU use meanwhile;
2. live: the members stay, and `--events` more are published as fast as
   this process can while they consume: acked events/s, publish -> ack
   latency (the event's `ts` to the client reading the ack's reply);
3. redelivery: a member holding `--held` unacked events disconnects;
   how long until another member has all of them (attempt 2), on the same
   node and on the other node; `--rounds` times each.

    PYTHONPATH=. python scripts/bench_groups.py [--members 10] [--events 200000]

Every node runs with `limits.ops_per_second` raised (members ack ~1000
times a second each) and a `jobs.>` namespace whose history holds the whole
backlog (a group delivers only what its channel retains).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import trio
from benchlib import throwaway_redis
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    Ping,
    Request,
    TextMessage,
)

from apix_trio.auth.devkeys import ensure_dev_keys, mint_token
from apix_trio.broker.model import Retention
from apix_trio.broker.redis.events import open_redis_broker
from apix_trio.settings import BrokerSettings, Settings

ORG, CHANNEL, GROUP, PREFIX = "bench", "jobs.q", "w", "bench"
RETENTION = Retention(history_size=2_000_000, history_ttl=3600.0)
REPO = Path(__file__).resolve().parent.parent


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Tally:
    """Acked events of every member; `reached` is set at `target`."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.acked = 0
        self.reached = trio.Event()

    def add(self, n: int) -> None:
        self.acked += n
        if self.acked >= self.target:
            self.reached.set()


class Member:
    """One raw WebSocket client: reads pushes, acks what it read."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pushes: list[dict[str, Any]] = []
        self.replies: dict[int, dict[str, Any]] = {}
        self.acked = 0
        self.tally = Tally(0)
        self.received = 0
        self.ack_latencies: list[float] = []
        self._ids = 100
        self._parts: list[str] = []

    @classmethod
    async def open(cls, port: int, token: str) -> Member:
        member = cls(await trio.open_tcp_stream("127.0.0.1", port))
        await member.stream.send_all(member.ws.send(Request(host="bench", target="/ws")))
        while True:
            events = await member._read()
            if any(isinstance(e, AcceptConnection) for e in events):
                break
        await member.call("auth", token=token)
        return member

    async def _read(self) -> list[Any]:
        data = await self.stream.receive_some(1 << 20)
        self.ws.receive_data(data or None)
        out = []
        for event in self.ws.events():
            if isinstance(event, Ping):
                await self.stream.send_all(self.ws.send(event.response()))
            elif isinstance(event, TextMessage):
                self._parts.append(event.data)
                if event.message_finished:
                    frame = orjson.loads("".join(self._parts))
                    self._parts.clear()
                    if "push" in frame:
                        self.pushes.append(frame)
                    else:
                        self.replies[frame["id"]] = frame
            elif isinstance(event, CloseConnection):
                raise EOFError(f"closed {event.code}")
            out.append(event)
        if not data:
            raise EOFError("connection lost")
        return out

    async def send(self, op: str, **fields: Any) -> int:
        self._ids += 1
        text = orjson.dumps({"op": op, "id": self._ids, **fields}).decode()
        await self.stream.send_all(self.ws.send(Message(data=text)))
        return self._ids

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        frame_id = await self.send(op, **fields)
        while frame_id not in self.replies:
            await self._read()
        reply = self.replies.pop(frame_id)
        assert reply["ok"], reply
        result: dict[str, Any] = reply["result"]
        return result

    async def consume(self, stop: trio.Event, *, ack: bool = True) -> None:
        """Read pushes; after each read, ack all of them in one op."""
        pending_acks: dict[int, list[int]] = {}
        while not stop.is_set():
            await self._read()
            if self.pushes:
                batch, self.pushes = self.pushes, []
                self.received += len(batch)
                if ack:
                    ids = [push["event"]["id"] for push in batch]
                    frame_id = await self.send("ack", channel=CHANNEL, group=GROUP, ids=ids)
                    pending_acks[frame_id] = [push["event"]["ts"] for push in batch]
            for frame_id in [i for i in pending_acks if i in self.replies]:
                reply = self.replies.pop(frame_id)
                self.acked += reply["result"]["acked"]
                self.tally.add(reply["result"]["acked"])
                now_ms = time.time() * 1000
                self.ack_latencies.extend(now_ms - ts for ts in pending_acks.pop(frame_id))

    async def close(self) -> None:
        await self.stream.aclose()


async def start_node(name: str, config: Path) -> tuple[trio.Process, int]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("APIX_")}
    env.update(APIX_CONFIG=str(config), APIX_SERVER_NODE_ID=name, PYTHONPATH=str(REPO))
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "apix_trio", "serve"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stderr is not None
    buffer = b""
    with trio.fail_after(30):
        while True:
            chunk = await process.stderr.receive_some(65536)
            if not chunk:
                raise RuntimeError(f"node {name} exited: {buffer.decode(errors='replace')}")
            buffer += chunk
            for line in buffer.split(b"\n"):
                if b'"listening"' in line:
                    return process, int(orjson.loads(line)["ws_port"])


async def drain_stderr(process: trio.Process) -> None:
    assert process.stderr is not None
    while await process.stderr.receive_some(65536):
        pass


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def publish_all(redis_url: str, n: int, concurrency: int = 256) -> float:
    """Publish n events at once (the broker batches them); returns seconds."""
    settings = Settings(broker=BrokerSettings(redis_url=redis_url, key_prefix=PREFIX))
    async with open_redis_broker(settings) as broker:
        start = time.perf_counter()
        left = iter(range(n))

        async def publisher() -> None:
            for i in left:
                await broker.publish(
                    ORG, CHANNEL, f'{{"n":{i}}}', sender="bench", key=None, retention=RETENTION
                )

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(publisher)
        return time.perf_counter() - start


async def publish_elsewhere(redis_url: str, n: int) -> float:
    """`publish_all` in a child process; returns its seconds."""
    done = await trio.run_process(
        [sys.executable, __file__, "--publish", str(n), "--redis-url", redis_url],
        capture_stdout=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return float(done.stdout.decode().split()[-1])


async def bench(redis_url: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    keys = workdir / "keys"
    private, _, _ = ensure_dev_keys(keys)
    config = workdir / "apix.toml"
    config.write_text(
        f"""
[server]
ws_port = 0
http_port = 0
[broker]
redis_url = "{redis_url}"
key_prefix = "{PREFIX}"
[auth]
dev_key_dir = "{keys}"
[limits]
ops_per_second = 1000000
[delivery]
group_prefetch = {args.prefetch}
retry_base = 30
[log]
level = "info"

[[namespaces]]
pattern = "jobs.>"
history_size = {RETENTION.history_size}
history_ttl = 3600
"""
    )

    def token(sub: str) -> str:
        return mint_token(private, org=ORG, sub=sub, pub=(">",), sub_patterns=(">",))

    results: dict[str, Any] = {}
    node_a, port_a = await start_node("bench-a", config)
    node_b, port_b = await start_node("bench-b", config)
    try:
        async with trio.open_nursery() as logs:
            logs.start_soon(drain_stderr, node_a)
            logs.start_soon(drain_stderr, node_b)

            # 1. backlog
            settings = Settings(broker=BrokerSettings(redis_url=redis_url, key_prefix=PREFIX))
            async with open_redis_broker(settings) as broker:
                await broker.publish(ORG, CHANNEL, "0", sender="b", key=None, retention=RETENTION)
                await broker.groups.join(ORG, CHANNEL, GROUP)
            seconds = await publish_all(redis_url, args.events)
            results["publish_rate"] = args.events / seconds
            members = [await Member.open(port_a, token(f"m{i}")) for i in range(args.members)]
            stop = trio.Event()
            tally = Tally(args.events)
            for member in members:
                member.tally = tally
            cpu0, start = cpu_seconds(node_a.pid), time.perf_counter()
            others0 = time.process_time(), redis_cpu(redis_url), evalsha_calls(redis_url)
            async with trio.open_nursery() as nursery:
                for member in members:
                    await member.call("subscribe", channel=CHANNEL, group=GROUP)
                    nursery.start_soon(member.consume, stop)
                await tally.reached.wait()
                elapsed = time.perf_counter() - start
                cpu = cpu_seconds(node_a.pid) - cpu0
                results["backlog_rate"] = args.events / elapsed
                results["backlog_cpu"] = cpu / elapsed
                results["backlog_bench_cpu"] = (time.process_time() - others0[0]) / elapsed
                results["backlog_redis_cpu"] = (redis_cpu(redis_url) - others0[1]) / elapsed
                results["backlog_scripts"] = (evalsha_calls(redis_url) - others0[2]) / args.events
                results["backlog_shares"] = sorted(m.acked for m in members)

                # 2. live
                tally = Tally(args.events)
                for member in members:
                    member.ack_latencies, member.tally = [], tally
                cpu0, start = cpu_seconds(node_a.pid), time.perf_counter()
                # published from another process, so that it does not
                # compete with the members for this one
                publish_seconds = await publish_elsewhere(redis_url, args.events)
                await tally.reached.wait()
                elapsed = time.perf_counter() - start
                results["live_publish_rate"] = args.events / publish_seconds
                results["live_rate"] = args.events / elapsed
                results["live_cpu"] = (cpu_seconds(node_a.pid) - cpu0) / elapsed
                latencies = [x for m in members for x in m.ack_latencies]
                results["live_latency_ms"] = (quantile(latencies, 0.5), quantile(latencies, 0.99))
                stop.set()
                for member in members:
                    await member.send("ping")  # wake each reader so it sees `stop`
            for member in members:
                await member.close()

            # 3. redelivery after a disconnect, same node and other node
            for label, port in (("same node", port_a), ("other node", port_b)):
                times = []
                for round_ in range(args.rounds):
                    holder = await Member.open(port_a, token(f"holder{round_}"))
                    await holder.call("subscribe", channel=CHANNEL, group=GROUP)
                    await publish_all(redis_url, args.held, concurrency=8)
                    while len(holder.pushes) < args.held:
                        await holder._read()
                    taker = await Member.open(port, token(f"taker{round_}"))
                    await taker.call("subscribe", channel=CHANNEL, group=GROUP)
                    started = time.perf_counter()
                    await holder.close()
                    while len(taker.pushes) < args.held:
                        await taker._read()
                    times.append(time.perf_counter() - started)
                    assert all(p["attempt"] >= 2 for p in taker.pushes), taker.pushes[:2]
                    ids = [p["event"]["id"] for p in taker.pushes]
                    assert (await taker.call("ack", channel=CHANNEL, group=GROUP, ids=ids))[
                        "acked"
                    ] == args.held
                    await taker.close()
                results[f"handover {label}"] = (
                    quantile(times, 0.5) * 1000,
                    quantile(times, 0.99) * 1000,
                    max(times) * 1000,
                )
            logs.cancel_scope.cancel()
    finally:
        for process in (node_a, node_b):
            process.terminate()
            with trio.CancelScope(shield=True):
                await process.wait()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--prefetch", type=int, default=32)
    parser.add_argument("--held", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--publish", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publish:  # the child of `publish_elsewhere`
        print(trio.run(publish_all, args.redis_url, args.publish))
        return
    with throwaway_redis() as (redis_url, directory):
        results = trio.run(bench, redis_url, args, Path(directory))
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cpus, {platform.python_implementation()} "
        f"{platform.python_version()}, redis {_redis_version()}"
    )
    print(
        f"members={args.members} prefetch={args.prefetch} events={args.events}: "
        f"publish {results['publish_rate']:,.0f}/s (bench process, into Redis)"
    )
    print(
        f"backlog: {results['backlog_rate']:,.0f} acked events/s, node CPU "
        f"{results['backlog_cpu']:.0%} (members, this process: "
        f"{results['backlog_bench_cpu']:.0%}; Redis: {results['backlog_redis_cpu']:.0%}, "
        f"{results['backlog_scripts']:.2f} script calls per event), "
        f"per member {results['backlog_shares']}"
    )
    p50, p99 = results["live_latency_ms"]
    print(
        f"live:    {results['live_rate']:,.0f} acked events/s while publishing at "
        f"{results['live_publish_rate']:,.0f}/s, node CPU {results['live_cpu']:.0%}, "
        f"publish->ack p50 {p50:.1f} ms p99 {p99:.1f} ms"
    )
    for label in ("same node", "other node"):
        p50, p99, worst = results[f"handover {label}"]
        print(
            f"redelivery after a disconnect ({label}, {args.held} events, {args.rounds} rounds): "
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {worst:.1f} ms"
        )


def redis_info(url: str, section: str) -> dict[str, str]:
    """INFO `section` of the bench's redis-server, over a plain socket."""
    import socket

    host, _, rest = url.removeprefix("redis://").partition(":")
    with socket.create_connection((host, int(rest.split("/")[0])), timeout=5) as sock:
        sock.sendall(b"INFO %s\r\n" % section.encode())
        data = sock.recv(65536)
        size = int(data[1 : data.index(b"\r\n")])
        while len(data) < size + len(str(size)) + 5:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return dict(line.split(":", 1) for line in data.decode().split("\r\n") if ":" in line)


def redis_cpu(url: str) -> float:
    """CPU seconds redis-server has used (INFO cpu)."""
    fields = redis_info(url, "cpu")
    return float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])


def evalsha_calls(url: str) -> int:
    """Script calls Redis has run (INFO commandstats)."""
    text = redis_info(url, "commandstats").get("cmdstat_evalsha", "calls=0")
    return int(text.split(",")[0].partition("=")[2])


def _redis_version() -> str:
    out = subprocess.run(
        [shutil.which("redis-server") or "redis-server", "--version"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return out.split("v=")[1].split()[0] if "v=" in out else "?"


if __name__ == "__main__":
    main()
