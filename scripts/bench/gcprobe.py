"""Run `python -m apix_trio serve` with the cyclic GC's time accounted.

Used only by `scripts/bench_gateway.py --profile`: installs a `gc.callbacks`
timer, then runs the server in this process. On SIGUSR1 it appends one line
to $GCPROBE_OUT: wall time, process CPU seconds, tracked objects and, per
generation, the number of collections and the seconds spent in them. Two
lines around a measured window give the GC's share of the server's CPU.

    python scripts/bench/gcprobe.py   (APIX_* environment as for `serve`)
"""

from __future__ import annotations

import gc
import json
import os
import runpy
import signal
import sys
import time

_stats = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
_started = [0.0]


def _callback(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        entry = _stats[info["generation"]]
        entry[0] += 1
        entry[1] += time.perf_counter() - _started[0]


def _dump(signum: int, frame: object) -> None:
    line = {
        "wall": time.time(),
        "cpu": time.process_time(),
        "objects": len(gc.get_objects()),
        "gens": {str(g): {"n": n, "s": round(s, 6)} for g, (n, s) in _stats.items()},
    }
    with open(os.environ.get("GCPROBE_OUT", "gcprobe.jsonl"), "a") as out:
        out.write(json.dumps(line) + "\n")


if os.environ.get("GCPROBE_THRESHOLD"):
    gc.set_threshold(*(int(x) for x in os.environ["GCPROBE_THRESHOLD"].split(",")))
gc.callbacks.append(_callback)
signal.signal(signal.SIGUSR1, _dump)
sys.argv = ["apix-trio", "serve"]
runpy.run_module("apix_trio", run_name="__main__", alter_sys=True)
