"""Presence storm: many connections join one channel while many watch.

Starts one `python -m apix_trio serve` node (embedded broker, then a
throwaway redis-server) with a `room.>` namespace that keeps presence, and
from this process (raw sockets on trio, one task per connection):

1. `--watchers` connections subscribe to `room.storm` with `presence: true`,
   one after the other (so each gets exactly one `join` push per later
   watcher); the script waits until all those pushes arrived;
2. `--joiners` more connections authenticate, then all subscribe with
   `presence: true` within `--spread` seconds (paced evenly): the storm;
3. it waits until every watcher has a `join` push for every joiner (each
   checked by conn id: nothing missing, nothing doubled) and reports the
   time from the first storm subscribe to the last such push, the time to
   the last joiner's reply, and the node's CPU seconds meanwhile.

The client side parses frames by hand (server frames are unmasked; only
headers are decoded and the conn id is found with `bytes.find`), because a
full WebSocket + JSON parse of ~1.5 million pushes would measure the client.
Every phase is bounded (`--timeout` seconds).

    PYTHONPATH=. python scripts/bench_presence.py [--watchers 1000] [--joiners 1000]
"""

from __future__ import annotations

import argparse
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import trio
from benchlib import throwaway_redis

from apix_trio.auth.devkeys import ensure_dev_keys, mint_token

REPO = Path(__file__).resolve().parent.parent
CHANNEL = "room.storm"
CONNECT_CONCURRENCY = 64


class Conn:
    """A raw WebSocket client: masked text frames out, frames parsed by hand."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.replies: dict[int, bytes] = {}
        self.reply_event = trio.Event()
        self.conn_id = ""
        self.counting = False
        self.joins: set[bytes] = set()
        self.doubled = 0
        self.last_join_at = 0.0
        self.enough = trio.Event()
        self.expect = 1 << 62
        self.reply_at = 0.0
        self._ids = 0

    @classmethod
    async def open(cls, port: int) -> Conn:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = cls(stream)
        await stream.send_all(
            b"GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        while b"\r\n\r\n" not in conn.buffer:
            data = await stream.receive_some(65536)
            if not data:
                raise EOFError("closed during the handshake")
            conn.buffer += data
        head, _, rest = bytes(conn.buffer).partition(b"\r\n\r\n")
        assert b" 101 " in head.split(b"\r\n")[0], head
        conn.buffer = bytearray(rest)
        return conn

    async def send(self, op: str, **fields: Any) -> int:
        self._ids += 1
        payload = orjson.dumps({"op": op, "id": self._ids, **fields})
        n = len(payload)
        if n < 126:
            header = bytes([0x81, 0x80 | n])
        elif n < 65536:
            header = bytes([0x81, 0x80 | 126]) + struct.pack("!H", n)
        else:
            header = bytes([0x81, 0x80 | 127]) + struct.pack("!Q", n)
        await self.stream.send_all(header + b"\0\0\0\0" + payload)  # mask key 0
        return self._ids

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        frame_id = await self.send(op, **fields)
        while frame_id not in self.replies:
            await self.reply_event.wait()
        reply = orjson.loads(self.replies.pop(frame_id))
        assert reply["ok"], reply
        result: dict[str, Any] = reply["result"]
        return result

    async def read_forever(self) -> None:
        buffer = self.buffer
        while True:
            data = await self.stream.receive_some(1 << 20)
            if not data:
                return
            buffer += data
            at = 0
            end = len(buffer)
            while end - at >= 2:
                opcode = buffer[at] & 0x0F
                length = buffer[at + 1] & 0x7F
                start = at + 2
                if length == 126:
                    if end - at < 4:
                        break
                    length = struct.unpack_from("!H", buffer, at + 2)[0]
                    start = at + 4
                elif length == 127:
                    if end - at < 10:
                        break
                    length = struct.unpack_from("!Q", buffer, at + 2)[0]
                    start = at + 10
                if end - start < length:
                    break
                if opcode == 1:
                    self._frame(bytes(buffer[start : start + length]))
                at = start + length
            del buffer[:at]

    def _frame(self, payload: bytes) -> None:
        if payload.startswith(b'{"id":'):
            comma = payload.index(b",")
            self.replies[int(payload[6:comma])] = payload
            self.reply_at = time.monotonic()
            self.reply_event.set()
            self.reply_event = trio.Event()
            return
        if not self.counting or not payload.startswith(b'{"push":"presence"'):
            return
        at = payload.find(b'"join":')
        if at < 0:
            return
        at = payload.find(b'"conn":"', at) + 8
        conn = payload[at : payload.index(b'"', at)]
        if conn in self.joins:
            self.doubled += 1
        self.joins.add(conn)
        self.last_join_at = time.monotonic()
        if len(self.joins) >= self.expect:
            self.enough.set()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def start_node(config: Path) -> tuple[trio.Process, int]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("APIX_")}
    env.update(APIX_CONFIG=str(config), PYTHONPATH=str(REPO))
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
                raise RuntimeError(f"the node exited: {buffer.decode(errors='replace')}")
            buffer += chunk
            for line in buffer.split(b"\n"):
                if b'"listening"' in line:
                    return process, int(orjson.loads(line)["ws_port"])


async def drain(process: trio.Process) -> None:
    assert process.stderr is not None
    while await process.stderr.receive_some(65536):
        pass


def write_config(directory: Path, redis_url: str) -> Path:
    config = directory / "apix.toml"
    config.write_text(
        f"""
[server]
ws_port = 0
http_port = 0
node_id = "bench"
[broker]
redis_url = "{redis_url}"
key_prefix = "bench"
[auth]
dev_key_dir = "{directory / "keys"}"
[limits]
ops_per_second = 100000
outbox_size = 100000
outbox_bytes = 268435456
[heartbeat]
interval = 3600
[presence]
max_members = 10000
[log]
level = "info"
[[namespaces]]
pattern = "room.>"
presence = true
history_size = 0
"""
    )
    return config


async def connect_all(
    port: int, key: Path, count: int, prefix: str, nursery: trio.Nursery
) -> list[Conn]:
    conns: list[Conn] = []
    limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)

    async def one(i: int) -> None:
        async with limiter:
            conn = await Conn.open(port)
            nursery.start_soon(conn.read_forever)
            token = mint_token(key, org="bench", sub=f"{prefix}{i}", sub_patterns=[">"])
            result = await conn.call("auth", token=token)
            conn.conn_id = result["conn"]
            conns.append(conn)

    async with trio.open_nursery() as inner:
        for i in range(count):
            inner.start_soon(one, i)
    return conns


async def storm(
    port: int, key: Path, process: trio.Process, args: argparse.Namespace
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        with trio.fail_after(args.timeout):
            watchers = await connect_all(port, key, args.watchers, "watcher", nursery)
            started = time.monotonic()
            for watcher in watchers:
                watcher.counting = True
                result = await watcher.call("subscribe", channel=CHANNEL, presence=True)
                assert result["presence"]["total"] >= 1
            # Each watcher gets one join per later watcher: wait for all of them.
            for index, watcher in enumerate(watchers):
                watcher.expect = len(watchers) - 1 - index
                watcher.enough = trio.Event()
                if len(watcher.joins) >= watcher.expect:
                    watcher.enough.set()
            for watcher in watchers:
                await watcher.enough.wait()
            out["setup_s"] = time.monotonic() - started
            for watcher in watchers:
                watcher.joins = set()
                watcher.enough = trio.Event()
                watcher.expect = args.joiners
            joiners = await connect_all(port, key, args.joiners, "joiner", nursery)
            expected = {joiner.conn_id.encode() for joiner in joiners}

        cpu_before = cpu_seconds(process.pid)
        with trio.fail_after(args.timeout):
            t0 = time.monotonic()
            replies: list[int] = []
            for index, joiner in enumerate(joiners):
                replies.append(await joiner.send("subscribe", channel=CHANNEL, presence=True))
                await trio.sleep_until(_trio_at(t0, args.spread * (index + 1) / len(joiners)))
            out["sent_s"] = time.monotonic() - t0
            for watcher in watchers:
                await watcher.enough.wait()
            for joiner, frame_id in zip(joiners, replies, strict=True):
                while frame_id not in joiner.replies:
                    await joiner.reply_event.wait()
                reply = orjson.loads(joiner.replies[frame_id])
                assert reply["ok"], reply
        out["cpu_s"] = cpu_seconds(process.pid) - cpu_before
        out["last_push_s"] = max(w.last_join_at for w in watchers) - t0
        out["last_reply_s"] = max(j.reply_at for j in joiners) - t0
        out["missing"] = sum(len(expected - w.joins) for w in watchers)
        out["extra"] = sum(len(w.joins - expected) + w.doubled for w in watchers)
        out["pushes"] = sum(len(w.joins) for w in watchers)
        nursery.cancel_scope.cancel()
    return out


def _trio_at(t0_monotonic: float, offset: float) -> float:
    """The trio time of `t0 + offset` on the monotonic clock."""
    return trio.current_time() + (t0_monotonic + offset - time.monotonic())


async def run_one(redis_url: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as directory:
        config = write_config(Path(directory), redis_url)
        private, _, _ = ensure_dev_keys(Path(directory) / "keys")
        process, port = await start_node(config)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain, process)
                result = await storm(port, Path(private), process, args)
                nursery.cancel_scope.cancel()
            return result
        finally:
            process.terminate()
            with trio.move_on_after(10):
                await process.wait()
            process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--joiners", type=int, default=1000)
    parser.add_argument(
        "--spread", type=float, default=1.0, help="seconds the joins are spread over"
    )
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--only", choices=["embedded", "redis"])
    args = parser.parse_args()
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    print(
        f"machine: {platform.machine()}, nproc {os.cpu_count()}, {cpu}, "
        f"{platform.python_implementation()} {platform.python_version()}; "
        f"{time.strftime('%Y-%m-%d')}"
    )
    runs = []
    if args.only != "redis":
        runs.append(("embedded", ""))
    if args.only != "embedded":
        runs.append(("redis", None))
    for label, url in runs:
        if url is None:
            with throwaway_redis() as (redis_url, _):
                result = trio.run(run_one, redis_url, args)
        else:
            result = trio.run(run_one, url, args)
        print(
            f"{label}: {args.watchers} watchers, {args.joiners} joins sent in "
            f"{result['sent_s']:.2f} s; last join push {result['last_push_s']:.2f} s after the "
            f"first subscribe, last joiner reply {result['last_reply_s']:.2f} s; "
            f"{result['pushes']:,} join pushes checked, missing {result['missing']}, "
            f"extra {result['extra']}; node CPU {result['cpu_s']:.2f} s; "
            f"(setup: {args.watchers} watchers joined one by one in {result['setup_s']:.1f} s)"
        )


if __name__ == "__main__":
    main()
