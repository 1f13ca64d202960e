"""scripts/soak.py end to end at a small scale: the C load generator's soak
mode, the server's heartbeats (5 s) and the verdicts. The 15,000-connection,
10-minute run is documented in docs/benchmarks.md, not run here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_a_small_soak_delivers_every_event_to_every_subscriber() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "soak.py"),
         "--conns", "60", "--rate", "20", "--duration", "6", "--report", "2"],
        capture_output=True, text=True, timeout=240, check=False, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout)
    loadgen = report["loadgen"]
    assert report["ok"] and all(report["checks"].values())
    assert loadgen["subs"] == 60 and loadgen["subs_ready_at_end"] == 60
    assert loadgen["published"] >= 100 and loadgen["acks"] == loadgen["published"]
    assert loadgen["delivered"] == loadgen["expected"] == loadgen["published"] * 60
    assert loadgen["missed"] == loadgen["disordered"] == loadgen["closes"] == 0
    assert loadgen["pings"] >= 60  # every connection was pinged (5 s) and answered
    assert len(report["rss_samples"]) >= 4  # start, every 2 s, end
