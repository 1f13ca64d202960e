#!/usr/bin/env python3
"""HTTP publish throughput: `POST /api/v1/channels/{channel}/events` with an
admin token against a bare baseline on the same stack.

Both servers are FastAPI apps under hypercorn's trio worker, in their own
process, one core's worth of Python each:

- baseline: one route that parses the same body with a pydantic model and
  answers a constant `{"id", "ts", "duplicate"}` (no auth, no broker, no
  middleware);
- apix: `apix-trio serve` (embedded broker, or Redis with `--redis`),
  the real route: bearer token (verified once, then cached), rate limit
  (raised out of the way), body limit, headers, access log, publish.

The load generator is `wrk` (Debian package `wrk`, C, keep-alive) with a Lua
script for the POST body: `--connections` concurrent connections (64) on
one thread for `--duration` seconds, after a short warm-up.

Both servers run the whole time and are measured in alternating rounds
(`--rounds`), so a noisy neighbour on a shared machine hits both alike.
Besides requests/s (what wrk saw) it reports the server process's CPU time
per request (utime + stime from /proc around each round): on a busy machine
that is the steadier figure, and `1 / cpu_per_request` is the rate one free
core would sustain. `ratio` compares medians of requests/s, `cpu_ratio`
the capacities (baseline CPU per request / apix CPU per request).

Usage: python3 scripts/bench_http.py [--duration 10] [--connections 64] [--rounds 3] [--redis]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchlib import free_port, throwaway_redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from apix_trio.auth.devkeys import ensure_dev_keys, mint_token  # noqa: E402

BODY = '{"data": {"user": "alice", "text": "hello, world", "n": 42}}'

BASELINE = r'''
import sys
from typing import Any
import trio
from fastapi import FastAPI
from pydantic import BaseModel, Field
from hypercorn.config import Config
from hypercorn.trio import serve

class Body(BaseModel):
    data: Any
    key: str | None = Field(None, min_length=1, max_length=128)

app = FastAPI()

@app.post("/api/v1/channels/{channel}/events")
async def publish(channel: str, body: Body) -> dict:
    return {"id": "0-0", "ts": 0, "duplicate": False}

config = Config()
config.bind = [f"127.0.0.1:{sys.argv[1]}"]
config.accesslog = None
config.errorlog = None
trio.run(serve, app, config)
'''

WRK_LUA = """
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
{auth}
"""


def wait_port(port: int, timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(
    port: int, pid: int, token: str | None, duration: int, connections: int
) -> dict[str, float]:
    auth = f'wrk.headers["Authorization"] = "Bearer {token}"' if token else ""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_LUA.format(body=BODY, auth=auth))
    url = f"http://127.0.0.1:{port}/api/v1/channels/bench.room/events"
    base = ["wrk", "-t1", f"-c{connections}", "-s", script.name, "--latency"]
    subprocess.run([*base, "-d2s", url], capture_output=True, check=True)  # warm-up
    cpu_before = cpu_seconds(pid)
    out = subprocess.run([*base, f"-d{duration}s", url], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    cpu = cpu_seconds(pid) - cpu_before
    os.unlink(script.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result = {
        "requests_per_s": rps,
        "cpu_us_per_request": round(cpu / max(total, 1) * 1e6, 1),
        "non_2xx": float(non2xx.group(1)) if non2xx else 0.0,
    }
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        if m:
            value = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
            result[f"p{pct}_ms"] = round(value, 2)
    return result


@contextmanager
def baseline_server() -> Iterator[tuple[int, int, None]]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", BASELINE, str(port)], cwd=REPO)
    try:
        wait_port(port)
        yield port, proc.pid, None
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def apix_server(redis_url: str) -> Iterator[tuple[int, int, str]]:
    http_port = free_port()
    with tempfile.TemporaryDirectory() as keys:
        private, _, _ = ensure_dev_keys(keys)
        env = {k: v for k, v in os.environ.items() if not k.startswith("APIX_")}
        env.update(
            APIX_SERVER_WS_PORT=str(free_port()),
            APIX_SERVER_HTTP_PORT=str(http_port),
            APIX_AUTH_DEV_KEY_DIR=keys,
            APIX_API_RATE_PER_ORG="1000000",
            APIX_LOG_LEVEL="info",
            APIX_BROKER_REDIS_URL=redis_url,
            PYTHONPATH=str(REPO),
        )
        proc = subprocess.Popen([sys.executable, "-m", "apix_trio", "serve"], env=env, cwd=REPO,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            wait_port(http_port)
            token = mint_token(Path(private), org="bench", sub="ops", ttl=3600, roles=("admin",))
            yield http_port, proc.pid, token
        finally:
            proc.terminate()
            proc.wait()


def summary(rounds: list[dict[str, float]]) -> dict[str, float]:
    keys = rounds[0].keys()
    return {key: round(statistics.median(r[key] for r in rounds), 2) for key in keys}


def compare(args: argparse.Namespace, redis_url: str) -> dict[str, object]:
    runs: dict[str, list[dict[str, float]]] = {"baseline": [], "apix": []}
    with baseline_server() as base, apix_server(redis_url) as apix:
        for _ in range(args.rounds):
            for name, (port, pid, token) in (("baseline", base), ("apix", apix)):
                runs[name].append(run_wrk(port, pid, token, args.duration, args.connections))
    base_s, apix_s = summary(runs["baseline"]), summary(runs["apix"])
    return {
        "broker": "redis" if redis_url else "memory",
        "baseline": base_s,
        "apix": apix_s,
        "ratio": round(apix_s["requests_per_s"] / base_s["requests_per_s"], 3),
        "cpu_ratio": round(base_s["cpu_us_per_request"] / apix_s["cpu_us_per_request"], 3),
        "rounds": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis", action="store_true", help="apix on a throwaway redis-server")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install -y wrk")
    if args.redis:
        with throwaway_redis() as (url, _):
            report = compare(args, url)
    else:
        report = compare(args, "")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
