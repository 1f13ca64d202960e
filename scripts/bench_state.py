#!/usr/bin/env python3
"""Benchmark: state changes on one key, fanned out to 1,000 subscribers, one node.

Self-contained like `bench_redis_path.py`, whose harness it reuses (`Stack`:
a throwaway redis-server, `python -m apix_trio serve` nodes, CPU pinning
and accounting, the C load generator `rpgen`). The load generator is
compiled in a state variant: its publishers send
`{"op":"state.set","key":"bench.c0","value":{"bt":<send time>,"p":"..."}}`
and its subscribers `state.subscribe` to the same key and time every
`{"push":"state",...}` they get against the `bt` inside it.

Per broker (the embedded one, then Redis), through the real wire protocol:

(a0) changes/s with no subscriber: 2 x `--writers` connections with
     8 x `--window` changes in flight each (the op path alone);
(a)  changes/s with `--subs` subscribers (default 1,000) of the key: every
     change is pushed to every subscriber, so deliveries/s = changes/s x subs;
(b)  change -> push latency (p50/p99 over every push) with the same
     subscribers, the writers paced at half the rate (a) reached.

Everything is bounded in time (`--warmup`, `--duration`, a timeout per
run); loopback only. Prints a summary and writes every figure as JSON
(`--json PATH`).

    python scripts/bench_state.py [--subs 1000] [--duration 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_redis_path import LOADGEN_C, Node, Stack, describe, machine, pinning  # noqa: E402

from apix_trio.auth.devkeys import ensure_dev_keys, mint_token  # noqa: E402

KEY_CHANNELS = 1  # one key: bench.c0

# The load generator's publish/subscribe frames, turned into state ops (each
# replacement must match exactly once, so a changed generator fails loudly).
_STATE_VARIANT = (
    (
        '"{\\"op\\":\\"publish\\",\\"id\\":%ld,\\"channel\\":\\"bench.c%d\\","\n'
        '                     "\\"data\\":',
        '"{\\"op\\":\\"state.set\\",\\"id\\":%ld,\\"key\\":\\"bench.c%d\\","\n'
        '                     "\\"value\\":',
    ),
    ('"{\\"push\\":\\"event\\"", 15', '"{\\"push\\":\\"state\\"", 15'),
    (
        '"{\\"op\\":\\"subscribe\\",\\"id\\":2,\\"channel\\":\\"bench.c%d\\"}"',
        '"{\\"op\\":\\"state.subscribe\\",\\"id\\":2,\\"key\\":\\"bench.c%d\\"}"',
    ),
)


def state_loadgen_source() -> str:
    source = LOADGEN_C
    for old, new in _STATE_VARIANT:
        if source.count(old) != 1:
            raise RuntimeError(f"bench_redis_path's load generator changed: {old!r}")
        source = source.replace(old, new)
    return source


class StateStack(Stack):
    """`Stack` with the state load generator and tokens allowed every key."""

    def build_loadgen(self) -> None:
        source = self.workdir / "rpgen-state.c"
        source.write_text(state_loadgen_source())
        subprocess.run(
            ["gcc", "-O2", "-Wall", "-o", str(self.loadgen), str(source)],
            check=True,
            timeout=120,
        )

    def start_node(self, name: str, *, redis: bool = True) -> Node:
        node = super().start_node(name, redis=redis)
        private, _, _ = ensure_dev_keys(self.workdir / "keys")
        self.token = mint_token(private, org="bench", sub="bench", state=(">",), ttl=24 * 3600)
        return node


def run_broker(
    stack: StateStack, name: str, redis: bool, args: argparse.Namespace
) -> dict[str, Any]:
    node = stack.start_node(name, redis=redis)
    common = {"channels": KEY_CHANNELS, "payload": args.payload}
    try:
        alone = stack.run_loadgen(
            node,
            warmup=args.warmup,
            duration=args.duration,
            pubs=args.writers * 2,
            subs=0,
            window=args.window * 8,  # enough in flight to find the op path's own limit
            **common,
        )
        print("   ", describe(f"{name} (a0) no subscriber", alone).replace("publishes", "changes"))
        fanned = stack.run_loadgen(
            node,
            warmup=args.warmup,
            duration=args.duration,
            pubs=args.writers,
            subs=args.subs,
            window=args.window,
            **common,
        )
        label = f"{name} (a) {args.subs} subscribers"
        print("   ", describe(label, fanned).replace("publishes", "changes"))
        half = max(1.0, fanned["publishes_per_s"] / 2)
        paced = stack.run_loadgen(
            node,
            warmup=args.warmup,
            duration=args.duration,
            pubs=args.writers,
            subs=args.subs,
            window=args.window * 4,
            rate=round(half, 1),
            **common,
        )
        label = f"{name} (b) {args.subs} subscribers at {half:,.0f} changes/s"
        print("   ", describe(label, paced).replace("publishes", "changes"))
        problems = node.problems()
    finally:
        node.stop()
    return {"no_subscribers": alone, "max": fanned, "half_rate": paced, "problems": problems}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subs", type=int, default=1000)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--window", type=int, default=4, help="changes in flight per writer")
    parser.add_argument("--payload", type=int, default=100, help="bytes of padding per value")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--no-redis", action="store_true", help="the embedded broker only")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--wait-quiet", type=float, default=0.0, help="wait up to S s for an idle machine per run"
    )
    parser.add_argument("--attempts", type=int, default=1, help="repeat a disturbed run")
    args = parser.parse_args()
    for tool in ("gcc", "redis-server"):
        if not shutil.which(tool):
            print(f"bench_state: needs {tool}", file=sys.stderr)
            return 2

    cpus = sorted(os.sched_getaffinity(0))
    workdir = Path(tempfile.mkdtemp(prefix="apix-bench-state-"))
    stack = StateStack(workdir, pinning(cpus))
    stack.wait_quiet = args.wait_quiet
    stack.attempts = args.attempts
    results: dict[str, Any] = {"machine": machine(), "nproc": len(cpus), "args": dict(vars(args))}
    results["args"]["json"] = str(args.json) if args.json else None
    started = time.time()
    try:
        stack.build_loadgen()
        stack.start_redis()
        print(f"state on one key, {args.subs} subscribers, {len(cpus)} CPUs")
        results["embedded"] = run_broker(stack, "embedded", False, args)
        if not args.no_redis:
            results["redis"] = run_broker(stack, "redis", True, args)
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    results["seconds"] = round(time.time() - started, 1)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    for broker in ("embedded", "redis"):
        for problem in results.get(broker, {}).get("problems", []):
            print(f"{broker} node problem: {problem[:300]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
