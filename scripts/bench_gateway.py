"""Gateway benchmark: apix-trio against two peers doing the same job, in one run.

    python scripts/bench_gateway.py            # full run (about 10 minutes)
    python scripts/bench_gateway.py --quick    # smoke run (about 35 s)
    python scripts/bench_gateway.py --no-profile --reps 1

Targets (each serves one broadcast channel on 127.0.0.1):

- apix     `python -m apix_trio serve`, embedded broker, RS256 dev token, the
           real protocol (auth, subscribe, publish; PROTOCOL.md).
- websockets  scripts/bench/websockets_server.py (asyncio, `broadcast`).
- node-ws  scripts/bench/ws_server.cjs on Node's `ws` (installed at run time
           into scripts/bench-out/node).

The server runs pinned to core 0 (`taskset -c 0`), the load generator to
core 1. The load generator is C (scripts/bench/loadgen.c, built here with
gcc): epoll, many connections in one thread; it reports its own CPU use and
the server's over every measured window.

Per repetition (--reps, default 3; target order rotates between reps) and
target, on a fresh server: connection rate (connect + upgrade + auth, then
reset); fan-out at N = 100 and 1,000 subscribers with 2 and 32 publishes in
flight, and the publish->deliver latency at 5 publishes/s (N = 1,000, and
N = 100 for contrast); then, on another fresh server, RSS per idle
authenticated connection (apix: Bearer RS256) at 10,000 connections with
heartbeats on (25 s interval on every target). docs/benchmarks.md explains
the method and the results. The table reports median [min-max] over the
repetitions. With --profile (default in a full run when py-spy is installed)
one more, unmeasured, apix run at N = 1,000 x 32 in flight is sampled with
py-spy and the cyclic GC's share of CPU is measured.

Everything written goes to scripts/bench-out/ (gitignored): the loadgen
binary, node_modules, dev keys, server logs, results.json, results.md and the
profile files. Every loop is bounded in count and time; only 127.0.0.1.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import free_port

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench"
OUT = ROOT / "scripts" / "bench-out"
SERVER_CPU = "0"
LOADGEN_CPU = "1"
HEARTBEAT_INTERVAL = 25.0  # seconds, all targets (apix default)
HEARTBEAT_TIMEOUT = 10.0
PAYLOAD = 200
NODE_WS_SPEC = "ws@8"
TARGET_NAMES = ("apix", "websockets", "node-ws")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def sh(cmd: list[str], **kw: Any) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# ------------------------------------------------------------------ set-up --


def raise_nofile(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            wanted = hard
    target = wanted if hard == resource.RLIM_INFINITY else min(max(soft, wanted), hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def build_loadgen() -> Path:
    source = BENCH / "loadgen.c"
    binary = OUT / "loadgen"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        log("building the load generator (gcc -O2)")
        sh(["gcc", "-O2", "-Wall", "-o", str(binary), str(source)])
    return binary


def install_node_ws() -> tuple[Path, str]:
    node_dir = OUT / "node"
    modules = node_dir / "node_modules"
    package = modules / "ws" / "package.json"
    if not package.exists():
        log(f"npm install {NODE_WS_SPEC} into {node_dir}")
        node_dir.mkdir(parents=True, exist_ok=True)
        manifest = node_dir / "package.json"
        if not manifest.exists():
            manifest.write_text('{"name": "apix-bench-peers", "private": true}\n')
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--no-save", NODE_WS_SPEC],
            cwd=node_dir,
            check=True,
            capture_output=True,
            timeout=180,
        )
    version = json.loads(package.read_text())["version"]
    return modules, version


def clean_env() -> dict[str, str]:
    """The inherited environment without any APIX_* setting (no stray config)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("APIX_")}


def apix_env(ws_port: int, http_port: int) -> dict[str, str]:
    env = clean_env()
    env.update(
        APIX_SERVER_WS_PORT=str(ws_port),
        APIX_SERVER_HTTP_PORT=str(http_port),
        APIX_AUTH_DEV_KEY_DIR=str(OUT / "keys"),
        # The publisher sends thousands of ops/s on one connection.
        APIX_LIMITS_OPS_PER_SECOND="1000000",
        APIX_HEARTBEAT_INTERVAL=str(HEARTBEAT_INTERVAL),
        APIX_HEARTBEAT_TIMEOUT=str(HEARTBEAT_TIMEOUT),
        APIX_LOG_LEVEL="warning",
    )
    return env


TOKENS_FILE = OUT / "tokens.txt"
DISTINCT_TOKENS = 20_000


def mint_distinct_tokens(count: int = DISTINCT_TOKENS) -> Path:
    """`count` RS256 tokens, each for its own `sub` (and `jti`), signed by the
    dev key: the connection-rate and idle runs present a new token on every
    connection, so the server verifies a new signature each time, as in a
    real connection storm. Cached in bench-out/ while valid for 2 more hours."""
    import jwt
    from cryptography.hazmat.primitives import serialization

    key_path = OUT / "keys" / "dev.key"
    if TOKENS_FILE.exists() and TOKENS_FILE.stat().st_mtime > key_path.stat().st_mtime:
        first = TOKENS_FILE.read_text().split("\n", 1)[0]
        claims = jwt.decode(first, options={"verify_signature": False})
        if claims["exp"] > time.time() + 7200 and TOKENS_FILE.read_text().count("\n") >= count:
            return TOKENS_FILE
    log(f"minting {count} distinct RS256 tokens")
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    now = int(time.time())
    perms = {"sub": [">"], "pub": [">"], "state": []}
    lines = []
    for i in range(count):
        claims = {
            "org": "bench",
            "sub": f"bench-{i}",
            "jti": f"{now}-{i}",
            "iat": now,
            "exp": now + 86_400,
            "perms": perms,
        }
        lines.append(jwt.encode(claims, key, algorithm="RS256", headers={"kid": "dev"}))  # type: ignore[arg-type]
    TOKENS_FILE.write_text("\n".join(lines) + "\n")
    return TOKENS_FILE


def mint_token() -> str:
    env = apix_env(0, 0)
    return sh(
        [
            sys.executable,
            "-m",
            "apix_trio",
            "token",
            "--org",
            "bench",
            "--sub",
            "bench",
            "--pub",
            ">",
            "--sub-pattern",
            ">",
            "--ttl",
            "7200",
        ],
        env=env,
        cwd=ROOT,
    ).strip()


# ---------------------------------------------------------------- servers --


class Server:
    """One target server process, pinned to SERVER_CPU."""

    def __init__(self, name: str, node_modules: Path, tag: str, *, gcprobe: Path | None = None):
        self.name = name
        self.port = free_port()
        self.log_path = OUT / "logs" / f"{name}-{tag}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = clean_env()
        if name == "apix":
            env = apix_env(self.port, free_port())
            if gcprobe is not None:
                env["GCPROBE_OUT"] = str(gcprobe)
                cmd = [sys.executable, str(BENCH / "gcprobe.py")]
            else:
                cmd = [sys.executable, "-m", "apix_trio", "serve"]
        elif name == "websockets":
            env["BENCH_HEARTBEAT_INTERVAL"] = str(HEARTBEAT_INTERVAL)
            env["BENCH_HEARTBEAT_TIMEOUT"] = str(HEARTBEAT_TIMEOUT)
            cmd = [sys.executable, str(BENCH / "websockets_server.py"), str(self.port)]
        else:
            env["BENCH_HEARTBEAT_INTERVAL"] = str(HEARTBEAT_INTERVAL)
            env["NODE_PATH"] = str(node_modules)
            cmd = [shutil.which("node") or "node", str(BENCH / "ws_server.cjs"), str(self.port)]
        self._log = self.log_path.open("w")
        # taskset execs the server, so the pid is the server's own.
        self.proc = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, *cmd],
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.pid = self.proc.pid
        self._wait_listening(30.0)

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early; see {self.log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen within {timeout}s; see {self.log_path}")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signum)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


# ------------------------------------------------------------ load runs --


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        loadgen: Path,
        node_modules: Path,
        token: str,
        tokens_file: Path,
    ):
        self.args = args
        self.loadgen = loadgen
        self.node_modules = node_modules
        self.token = token
        self.tokens_file = tokens_file
        quick = args.quick
        self.fanout_ns = [20] if quick else [100, 1000]
        self.windows = [2, 32]
        self.latency_n = self.fanout_ns[-1]
        self.latency_secs = 2.0 if quick else 5.0
        self.latency_secs_small = 2.0 if quick else 3.0
        self.warmup = 0.5 if quick else 0.75
        self.duration = 1.0 if quick else 2.5
        self.idle_conns = 200 if quick else 10_000
        self.idle_hold = 1.0 if quick else 3.0
        self.connrate_secs = 1.0 if quick else 2.5
        self.connrate_concurrency = 64

    def proto_args(self, target: str, *, header_auth: bool = False) -> list[str]:
        if target == "apix":
            out = ["--proto", "apix", "--token", self.token]
            if header_auth:
                # A new connection presents a token never seen before.
                out += ["--header-auth", "--tokens-file", str(self.tokens_file)]
            return out
        return ["--proto", "plain"]

    def run_loadgen(self, args: list[str], timeout: float) -> list[dict[str, Any]]:
        cmd = ["taskset", "-c", LOADGEN_CPU, str(self.loadgen), *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"loadgen timed out: {' '.join(args[:3])}") from exc
        results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not results:
            log(f"loadgen exit {proc.returncode}: {proc.stdout[-400:]} {proc.stderr[-400:]}")
        return results

    def connrate(self, server: Server) -> dict[str, Any]:
        args = [
            "connrate",
            "--port",
            str(server.port),
            *self.proto_args(server.name, header_auth=True),
            "--concurrency",
            str(self.connrate_concurrency),
            "--warmup",
            str(self.warmup),
            "--duration",
            str(self.connrate_secs),
            "--server-pid",
            str(server.pid),
            "--timeout",
            "60",
        ]
        results = self.run_loadgen(args, 90)
        return results[0] if results else {}

    def fanout(self, server: Server, n: int, phases: list[str]) -> list[dict[str, Any]]:
        budget = 30 + n / 50 + len(phases) * (self.warmup + self.latency_secs + 60)
        args = [
            "fanout",
            "--port",
            str(server.port),
            *self.proto_args(server.name),
            "--conns",
            str(n),
            "--concurrency",
            "128",
            "--phases",
            ",".join(phases),
            "--warmup",
            str(self.warmup),
            "--duration",
            str(self.duration),
            "--payload",
            str(PAYLOAD),
            "--server-pid",
            str(server.pid),
            "--timeout",
            str(int(budget)),
        ]
        return self.run_loadgen(args, budget + 30)

    def idle_rss(self, server: Server) -> dict[str, Any]:
        # Idle connections authenticate with the Bearer header (apix; one round
        # trip less than first-frame auth). Warm the server up first (lazy
        # imports, first auth, allocator pools).
        self.run_loadgen(
            [
                "idle",
                "--port",
                str(server.port),
                *self.proto_args(server.name, header_auth=True),
                "--conns",
                "50",
                "--hold",
                "0.3",
                "--timeout",
                "30",
            ],
            60,
        )
        time.sleep(1.0)
        before = server.rss_kib()
        n = self.idle_conns
        cmd = [
            "taskset",
            "-c",
            LOADGEN_CPU,
            str(self.loadgen),
            "idle",
            "--port",
            str(server.port),
            *self.proto_args(server.name, header_auth=True),
            "--conns",
            str(n),
            "--concurrency",
            "128",
            "--hold",
            str(self.idle_hold),
            "--timeout",
            "300",
        ]
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        after = None
        ready_line = held_line = ""
        result: dict[str, Any] = {}
        deadline = time.monotonic() + 330
        try:
            assert proc.stdout is not None and proc.stdin is not None
            for line in proc.stdout:
                if time.monotonic() > deadline:
                    break
                if line.startswith("READY"):
                    ready_line = line.strip()
                elif line.startswith("HELD"):
                    held_line = line.strip()
                    after = server.rss_kib()
                    proc.stdin.write("\n")
                    proc.stdin.flush()
                    proc.stdin.close()
                elif line.startswith("{"):
                    result = json.loads(line)
        finally:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if after is None:
            log(f"idle run failed: {result} {proc.stderr.read()[-400:] if proc.stderr else ''}")
            return {"failed": True, **result}
        ready = int(ready_line.split()[1]) if ready_line else 0
        pings = int(held_line.split()[1]) if held_line else 0
        return {
            "conns": ready,
            "rss_before_kib": before,
            "rss_after_kib": after,
            "kib_per_conn": (after - before) / max(ready, 1),
            "pings_during_hold": pings,
            "setup_s": float(ready_line.split()[2]) if ready_line else None,
            **{k: result.get(k) for k in ("setup_conns_per_s", "errors", "first_error")},
        }

    def suite(self, target: str, rep: int) -> dict[str, Any]:
        out: dict[str, Any] = {"target": target, "rep": rep, "load_before": loadavg()}
        server = Server(target, self.node_modules, f"rep{rep}")
        try:
            out["connrate"] = self.connrate(server)
            time.sleep(0.5)
            out["fanout"] = []
            for n in self.fanout_ns:
                phases = [f"w{w}" for w in self.windows]
                # Latency at 5 publishes/s: the target's N (and, for
                # contrast, the small N when there is one: lighter load).
                secs = self.latency_secs if n == self.latency_n else self.latency_secs_small
                phases.insert(0, f"r5:{secs}")
                out["fanout"].extend(self.fanout(server, n, phases))
                time.sleep(0.5)
        finally:
            server.stop()
        server = Server(target, self.node_modules, f"rep{rep}-idle")
        try:
            out["idle"] = self.idle_rss(server)
        finally:
            server.stop()
        out["load_after"] = loadavg()
        return out

    def profile(self) -> dict[str, Any]:
        """One unmeasured apix run at N=1000 x 32 in flight: py-spy + GC share."""
        pyspy = shutil.which("py-spy")
        gcfile = OUT / "profile-gc.jsonl"
        gcfile.unlink(missing_ok=True)
        server = Server("apix", self.node_modules, "profile", gcprobe=gcfile)
        n = self.fanout_ns[-1]
        raw = OUT / "profile-apix.txt"  # collapsed stacks (flamegraph.pl input)
        raw.unlink(missing_ok=True)
        spy_secs = max(2, int(self.duration * 2))
        cmd = [
            "taskset",
            "-c",
            LOADGEN_CPU,
            str(self.loadgen),
            "fanout",
            "--port",
            str(server.port),
            *self.proto_args("apix"),
            "--conns",
            str(n),
            "--concurrency",
            "128",
            "--phases",
            f"w32:{spy_secs + 1}",
            "--warmup",
            str(self.warmup),
            "--server-pid",
            str(server.pid),
            "--timeout",
            "180",
        ]
        result: dict[str, Any] = {}
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            spies: list[subprocess.Popen[str]] = []
            for line in proc.stdout:
                if line.startswith("WINDOW"):
                    server.signal(signal.SIGUSR1)
                    if pyspy:
                        spies.append(
                            subprocess.Popen(
                                [
                                    "taskset",
                                    "-c",
                                    LOADGEN_CPU,
                                    pyspy,
                                    "record",
                                    "-p",
                                    str(server.pid),
                                    "-d",
                                    str(spy_secs),
                                    "-r",
                                    "50",
                                    "-f",
                                    "raw",
                                    "-o",
                                    str(raw),
                                ],
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL,
                                text=True,
                            )
                        )
                elif line.startswith("{"):
                    server.signal(signal.SIGUSR1)
                    result["fanout"] = json.loads(line)
            proc.wait(timeout=60)
            for spy in spies:
                spy.wait(timeout=60)
        finally:
            time.sleep(0.3)
            server.stop()
        lines = [json.loads(x) for x in gcfile.read_text().splitlines()] if gcfile.exists() else []
        if len(lines) >= 2:
            a, b = lines[0], lines[-1]
            gc_secs = sum(b["gens"][g]["s"] - a["gens"][g]["s"] for g in "012")
            cpu = b["cpu"] - a["cpu"]
            result["gc"] = {
                "cpu_s": round(cpu, 3),
                "gc_s": round(gc_secs, 3),
                "gc_share": round(gc_secs / cpu, 3) if cpu else None,
                "collections": {g: b["gens"][g]["n"] - a["gens"][g]["n"] for g in "012"},
                "seconds": {g: round(b["gens"][g]["s"] - a["gens"][g]["s"], 3) for g in "012"},
                "objects": b["objects"],
            }
        if raw.exists():
            result["pyspy"] = summarize_profile(raw)
            result["pyspy_raw"] = str(raw.relative_to(ROOT))
        elif not pyspy:
            result["pyspy"] = "py-spy not installed (pip install py-spy)"
        return result


FOCUS = (
    "Connection._write_loop",
    "ServerWebSocket._send",
    "SocketStream.send_all",
    "CancelScope.__enter__",
    "Outbox.get_batch",
    "Router.dispatch",
    "ChannelSubscription.offer",
    "Connection._read_loop",
    "run_command",
    "Connection._heartbeat",
    "Histogram.observe",
    "unrolled_run",
)


def summarize_profile(raw: Path) -> dict[str, Any]:
    """Self and inclusive shares (%) from py-spy's collapsed stacks, by
    function (line numbers dropped)."""
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = [f.rsplit(":", 1)[0] + ")" if ":" in f else f for f in stack.split(";")]
        self_c[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n

    def share(counter: collections.Counter[str], top: int) -> list[tuple[str, float]]:
        return [(f, round(100 * v / total, 1)) for f, v in counter.most_common(top)]

    focus = {
        name: round(100 * sum(v for f, v in incl.items() if f.startswith(name + " ")) / total, 1)
        for name in FOCUS
    }
    return {
        "samples": total,
        "self_top": share(self_c, 20),
        "inclusive_focus": focus,
        "inclusive_top": share(incl, 30),
    }


# ------------------------------------------------------------ reporting --


def spread(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def aggregate(runs: list[dict[str, Any]], bench: Bench) -> dict[str, Any]:
    agg: dict[str, Any] = {}
    for target in TARGET_NAMES:
        mine = [r for r in runs if r["target"] == target]
        if not mine:
            continue
        t: dict[str, Any] = {}
        for n in bench.fanout_ns:
            for w in bench.windows:
                rows = [
                    f
                    for r in mine
                    for f in r.get("fanout", [])
                    if f.get("subs") == n and f.get("window") == w and not f.get("rate")
                ]
                t[f"thr_{n}_{w}"] = spread([f["delivered_per_s"] for f in rows])
                t[f"thr_cpu_{n}_{w}"] = spread(
                    [
                        f["delivered_per_s"] / f["server_cpu"]
                        for f in rows
                        if f.get("server_cpu", 0) > 0
                    ]
                )
                t[f"srvcpu_{n}_{w}"] = spread([f["server_cpu"] for f in rows])
                t[f"srvwait_{n}_{w}"] = spread([f.get("server_runq_wait") for f in rows])
                t[f"lgcpu_{n}_{w}"] = spread([f["loadgen_cpu"] for f in rows])
                t[f"closes_{n}_{w}"] = sum(f.get("server_closes", 0) for f in rows)
        for n in bench.fanout_ns:
            lat = [
                f
                for r in mine
                for f in r.get("fanout", [])
                if f.get("subs") == n and f.get("rate") and f["latency_us"]["n"]
            ]
            suffix = "" if n == bench.latency_n else f"_{n}"
            t[f"lat_p50_ms{suffix}"] = spread([f["latency_us"]["p50"] / 1000 for f in lat])
            t[f"lat_p99_ms{suffix}"] = spread([f["latency_us"]["p99"] / 1000 for f in lat])
            t[f"lat_samples{suffix}"] = sum(f["latency_us"]["n"] for f in lat)
            t[f"lat_srvcpu{suffix}"] = spread([f["server_cpu"] for f in lat])
        t["lgwait_all"] = spread(
            [f.get("loadgen_runq_wait") for r in mine for f in r.get("fanout", [])]
        )
        idle = [r["idle"] for r in mine if r.get("idle") and not r["idle"].get("failed")]
        t["kib_per_conn"] = spread([i["kib_per_conn"] for i in idle])
        t["idle_conns"] = min((i["conns"] for i in idle), default=0)
        t["idle_pings"] = spread([i["pings_during_hold"] for i in idle])
        t["idle_setup_rate"] = spread([i.get("setup_conns_per_s") for i in idle])
        cr = [r["connrate"] for r in mine if r.get("connrate")]
        t["conns_per_s"] = spread([c["conns_per_s"] for c in cr])
        t["conns_cpu"] = spread(
            [c["conns_per_s"] / c["server_cpu"] for c in cr if c.get("server_cpu", 0) > 0]
        )
        t["conn_srvcpu"] = spread([c["server_cpu"] for c in cr])
        t["conn_srvwait"] = spread([c.get("server_runq_wait") for c in cr])
        t["conn_setup_p50_ms"] = spread([c["setup_us"].get("p50", 0) / 1000 for c in cr])
        t["lgcpu_all"] = spread(
            [f["loadgen_cpu"] for r in mine for f in r.get("fanout", [])]
            + [r["connrate"]["loadgen_cpu"] for r in mine if r.get("connrate")]
        )
        agg[target] = t
    return agg


def fmt(s: dict[str, float] | None, digits: int = 0, unit: str = "") -> str:
    if not s:
        return "n/a"
    f = f"{{:,.{digits}f}}"
    if s["n"] == 1:
        return f.format(s["median"]) + unit
    return f"{f.format(s['median'])}{unit} [{f.format(s['min'])}-{f.format(s['max'])}]"


def cpu_wait(row: dict[str, Any], cpu: str, wait: str) -> str:
    return f"{fmt(row[cpu], 2)} / {fmt(row[wait], 2)}"


def table(agg: dict[str, Any], bench: Bench) -> str:
    targets = [t for t in TARGET_NAMES if t in agg]
    head = "| metric | " + " | ".join(targets) + " |\n|---|" + "---|" * len(targets) + "\n"
    rows = []
    for n in bench.fanout_ns:
        for w in bench.windows:
            rows.append(
                (
                    f"events/s, N={n:,}, {w} in flight",
                    [fmt(agg[t][f"thr_{n}_{w}"]) for t in targets],
                )
            )
            rows.append(
                (
                    f"  events per server-CPU-s, N={n:,}, {w} in flight",
                    [fmt(agg[t][f"thr_cpu_{n}_{w}"]) for t in targets],
                )
            )
            rows.append(
                (
                    "  server CPU / run-queue wait (share of core 0)",
                    [cpu_wait(agg[t], f"srvcpu_{n}_{w}", f"srvwait_{n}_{w}") for t in targets],
                )
            )
    for n in reversed(bench.fanout_ns):
        suffix = "" if n == bench.latency_n else f"_{n}"
        for pct in ("p50", "p99"):
            rows.append(
                (
                    f"publish->deliver {pct}, N={n:,} x 5/s (ms)",
                    [fmt(agg[t][f"lat_{pct}_ms{suffix}"], 1) for t in targets],
                )
            )
    rows.append(
        (
            f"RSS per idle conn at {bench.idle_conns:,} (KiB)",
            [fmt(agg[t]["kib_per_conn"], 1) for t in targets],
        )
    )
    rows.append(
        (
            "  idle set-up rate (conns/s; apix: Bearer RS256)",
            [fmt(agg[t]["idle_setup_rate"]) for t in targets],
        )
    )
    rows.append(
        ("new connections/s (apix: RS256 Bearer)", [fmt(agg[t]["conns_per_s"]) for t in targets])
    )
    rows.append(("  connections per server-CPU-s", [fmt(agg[t]["conns_cpu"]) for t in targets]))
    rows.append(
        (
            "  server CPU / run-queue wait (share of core 0)",
            [
                f"{fmt(agg[t]['conn_srvcpu'], 2)} / {fmt(agg[t]['conn_srvwait'], 2)}"
                for t in targets
            ],
        )
    )
    rows.append(
        (
            "load generator CPU / run-queue wait (share of core 1)",
            [f"{fmt(agg[t]['lgcpu_all'], 2)} / {fmt(agg[t]['lgwait_all'], 2)}" for t in targets],
        )
    )
    return head + "".join(f"| {name} | " + " | ".join(cells) + " |\n" for name, cells in rows)


def _median(agg: dict[str, Any], target: str, key: str) -> float | None:
    value = agg.get(target, {}).get(key)
    return value["median"] if value and value.get("median") else None


def _ratio_line(
    what: str,
    mine: float | None,
    theirs: float | None,
    target: float,
    peer: str,
    *,
    lower_is_better: bool = False,
) -> str | None:
    """`what: <ratio>x <peer> (target ...: MET|MISSED)`, or None when a side is missing."""
    if mine is None or theirs is None:
        return None
    ratio = mine / theirs
    met = ratio <= target if lower_is_better else ratio >= target
    sign = "<=" if lower_is_better else ">="
    return f"{what}: {ratio:.2f}x {peer} (target {sign} {target:g}x: {'MET' if met else 'MISSED'})"


def verdicts(agg: dict[str, Any], bench: Bench) -> list[str]:
    """Issue 12's targets, as ratios against the peers measured in the same run:
    events/s at the largest N >= 1.2x Node `ws` at 2 in flight and >= 2x at 32;
    p99 at N x 5/s <= Node `ws`'s; RSS per idle connection <= 1.0x
    `websockets` (stretch: <= Node `ws`); new connections/s with RS256 >=
    0.6x `websockets` (which authenticates nothing)."""
    if "apix" not in agg:
        return []
    n = bench.fanout_ns[-1]
    wanted = {2: 1.2, 32: 2.0}
    lines = []
    for w in bench.windows:
        key = f"thr_{n}_{w}"
        lines.append(
            _ratio_line(
                f"events/s N={n} W={w}",
                _median(agg, "apix", key),
                _median(agg, "node-ws", key),
                wanted.get(w, 1.0),
                "node-ws",
            )
        )
        cpu_key = f"thr_cpu_{n}_{w}"
        lines.append(
            _ratio_line(
                f"events/CPU-s N={n} W={w} (information)",
                _median(agg, "apix", cpu_key),
                _median(agg, "node-ws", cpu_key),
                wanted.get(w, 1.0),
                "node-ws",
            )
        )
    lines.append(
        _ratio_line(
            f"p99 N={n} x 5/s",
            _median(agg, "apix", "lat_p99_ms"),
            _median(agg, "node-ws", "lat_p99_ms"),
            1.0,
            "node-ws",
            lower_is_better=True,
        )
    )
    for peer, target in (("websockets", 1.0), ("node-ws", 1.0)):
        label = "RSS/idle conn" + (" (stretch)" if peer == "node-ws" else "")
        lines.append(
            _ratio_line(
                label,
                _median(agg, "apix", "kib_per_conn"),
                _median(agg, peer, "kib_per_conn"),
                target,
                peer,
                lower_is_better=True,
            )
        )
    lines.append(
        _ratio_line(
            "new connections/s (apix RS256)",
            _median(agg, "apix", "conns_per_s"),
            _median(agg, "websockets", "conns_per_s"),
            0.6,
            "websockets",
        )
    )
    return [line for line in lines if line is not None]


def machine() -> dict[str, Any]:
    lscpu = sh(["lscpu"])
    model = next(
        (x.split(":", 1)[1].strip() for x in lscpu.splitlines() if x.startswith("Model name")),
        "?",
    )
    try:
        git = sh(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT).strip()
        dirty = len(sh(["git", "status", "--porcelain"], cwd=ROOT).splitlines())
    except (subprocess.CalledProcessError, FileNotFoundError):
        git, dirty = "?", 0
    versions: dict[str, str] = {"python": platform.python_version()}
    for mod in ("trio", "wsproto", "orjson", "websockets", "cryptography", "jwt"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = "?"
    versions["node"] = sh(["node", "--version"]).strip()
    versions["gcc"] = sh(["gcc", "-dumpfullversion"]).strip()
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "git": f"{git} + {dirty} uncommitted paths" if dirty else git,
        "versions": versions,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny N, 1 rep, seconds")
    parser.add_argument("--reps", type=int, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument("--targets", default=",".join(TARGET_NAMES), help="comma list")
    parser.add_argument("--profile", dest="profile", action="store_true", default=None)
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    args = parser.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    targets = [t for t in args.targets.split(",") if t]
    for t in targets:
        if t not in TARGET_NAMES:
            parser.error(f"unknown target {t}")
    if (os.cpu_count() or 1) < 2:
        log("warning: fewer than 2 CPUs; server and load generator will share a core")
    started = time.monotonic()
    OUT.mkdir(parents=True, exist_ok=True)
    nofile = raise_nofile(32768)
    log(f"RLIMIT_NOFILE soft limit {nofile}")
    loadgen = build_loadgen()
    node_modules, ws_version = install_node_ws()
    token = mint_token()
    tokens_file = mint_distinct_tokens()
    info = machine()
    info["versions"]["node ws"] = ws_version
    bench = Bench(args, loadgen, node_modules, token, tokens_file)
    if nofile < bench.idle_conns + 1000:
        bench.idle_conns = max(100, nofile - 1000)
        log(f"RLIMIT_NOFILE too low: idle test uses {bench.idle_conns} connections")
    log(f"machine: {info['cpu_model']}, {info['cpus']} CPUs, load {loadavg()}")
    runs: list[dict[str, Any]] = []
    for rep in range(1, reps + 1):
        order = targets[rep - 1 :] + targets[: rep - 1]
        for target in order:
            log(f"rep {rep}/{reps}: {target} (load {loadavg()})")
            try:
                runs.append(bench.suite(target, rep))
            except Exception as exc:  # report and go on with the other targets
                log(f"{target} rep {rep} failed: {exc}")
                runs.append({"target": target, "rep": rep, "error": str(exc)})
    profile_result: dict[str, Any] | None = None
    do_profile = args.profile
    if do_profile is None:
        do_profile = not args.quick and bool(shutil.which("py-spy"))
    if do_profile and "apix" in targets:
        log(f"profile run: apix, N={bench.fanout_ns[-1]} x 32 in flight")
        try:
            profile_result = bench.profile()
        except Exception as exc:
            log(f"profile failed: {exc}")
    agg = aggregate(runs, bench)
    info["elapsed_s"] = round(time.monotonic() - started, 1)
    info["load_end"] = loadavg()
    report = table(agg, bench)
    checks = verdicts(agg, bench)
    if args.quick:
        checks.insert(0, "quick mode: tiny N and short windows, a smoke test, not a measurement")
    results = {
        "machine": info,
        "config": {
            "quick": args.quick,
            "reps": reps,
            "payload_bytes": PAYLOAD,
            "heartbeat_interval": HEARTBEAT_INTERVAL,
            "fanout_ns": bench.fanout_ns,
            "windows": bench.windows,
            "latency_n": bench.latency_n,
            "latency_secs": bench.latency_secs,
            "warmup": bench.warmup,
            "duration": bench.duration,
            "idle_conns": bench.idle_conns,
            "connrate_concurrency": bench.connrate_concurrency,
        },
        "aggregate": agg,
        "verdicts": checks,
        "profile": profile_result,
        "runs": runs,
    }
    suffix = "-quick" if args.quick else ""
    (OUT / f"results{suffix}.json").write_text(json.dumps(results, indent=1))
    md = f"{report}\n" + "\n".join(f"- {c}" for c in checks) + "\n"
    (OUT / f"results{suffix}.md").write_text(md)
    print(json.dumps(info, indent=1))
    print(md)
    if profile_result:
        print(json.dumps({k: v for k, v in profile_result.items() if k != "fanout"}, indent=1))
    log(f"done in {info['elapsed_s']} s; results in {OUT.relative_to(ROOT)}/results{suffix}.json")
    failed = [r for r in runs if r.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
