"""The fault campaign (`scripts/chaos.py`), 30 seconds of it, as part of the suite.

Three real nodes on a real redis-server (AOF, fsync always), reconnecting
clients behind the campaign's own load balancer, publishers retrying with
idempotency keys, a consumer group, and a fault every few seconds (each kind:
node SIGKILL + restart, node SIGSTOP/SIGCONT, Redis SIGKILL + restart, Redis
SIGSTOP/SIGCONT, a client's TCP connection reset). The campaign audits
everything acknowledged and exits non-zero on any violation; longer runs and
the Sentinel and Cluster modes are in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(300)


def test_a_30_second_campaign_loses_nothing() -> None:
    result = subprocess.run(
        [
            sys.executable, str(REPO / "scripts" / "chaos.py"),
            "--duration", "30", "--clients", "40", "--publishers", "6", "--rate", "5",
            "--group-members", "3", "--state-writers", "2", "--group-settle", "12",
            "--seed", "7",
        ],
        capture_output=True, text=True, timeout=280, check=False, cwd=REPO,
    )  # fmt: skip
    summary_start = result.stdout.rfind("\n{\n")
    assert summary_start >= 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout[summary_start:])
    assert result.returncode == 0, json.dumps(summary, indent=2)
    assert summary["violations"] == 0
    assert summary["events_acknowledged"] > 100
    assert summary["deliveries"] > summary["events_acknowledged"]
    assert summary["jobs"] > 0 and summary["cas_increments"] > 0
    assert set(summary["faults"]) == {
        "node_kill", "node_pause", "redis_kill", "redis_pause", "client_drop"
    }  # fmt: skip
