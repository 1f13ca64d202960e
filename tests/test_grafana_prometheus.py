"""The Grafana dashboard and the Prometheus alerting rules in config/.

- The dashboard's queries name every metric the server's /metrics actually
  exposes, and no metric it does not (a metric added to
  apix_trio/observability/metrics.py fails this test until a panel shows it).
- `promtool check rules` accepts config/prometheus/alerts.yml, the alerts
  the operations guide promises are there, and `promtool test rules` runs
  their unit tests (config/prometheus/alerts.test.yml); the example
  Prometheus configuration passes `promtool check config`.

promtool comes with Debian's `prometheus` package (scripts/test.sh installs
it when missing).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.httpclient import http_request
from tests.serverkit import running_server

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "config" / "grafana" / "apix-dashboard.json"
PROMETHEUS = REPO / "config" / "prometheus"
PROMTOOL = shutil.which("promtool")
METRIC_NAME = re.compile(r"\bapix_[a-z0-9_]+")
SAMPLE_SUFFIXES = ("_bucket", "_sum", "_count")
EXPECTED_ALERTS = {
    "ApixNodeDown",
    "ApixNotReady",
    "ApixSlowConsumerClosesRising",
    "ApixPublishDeliverP99High",
    "ApixRedisUnavailable",
    "ApixDeadLettersRising",
}


def exposed_metric_names(text: str) -> set[str]:
    """The metric names of a Prometheus text page (`# TYPE` lines), without
    prometheus_client's `*_created` companions of counters."""
    names = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[:2] == ["#", "TYPE"]:
            name, kind = parts[2], parts[3]
            if name.endswith("_created") and kind == "gauge":
                continue
            names.add(name)
    return names


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = [
        target["expr"]
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable.get("type") == "query":
            queries.append(variable["definition"])
    return queries


def referenced_metric_names(queries: list[str]) -> set[str]:
    """The metric names in `queries`, histogram sample suffixes removed."""
    names = set()
    for query in queries:
        for name in METRIC_NAME.findall(query):
            for suffix in SAMPLE_SUFFIXES:
                if name.endswith(suffix) and not name.endswith("_total"):
                    name = name.removesuffix(suffix)
                    break
            names.add(name)
    return names


async def test_the_dashboard_shows_every_metric_the_server_exposes(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        answer = await http_request(kit.running.http_port, "GET", "/metrics")
    assert answer.status == 200
    exposed = exposed_metric_names(answer.body.decode())
    assert "apix_publish_deliver_latency_seconds" in exposed
    assert "apix_events_published_total" in exposed
    dashboard = json.loads(DASHBOARD.read_text())
    referenced = referenced_metric_names(dashboard_queries(dashboard))
    assert exposed - referenced == set(), "metrics the dashboard does not show"
    assert referenced - exposed == set(), "dashboard metrics the server does not expose"


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] == "apix-trio"
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert variables == {"datasource", "instance"}
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["title"] and panel["targets"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], target["expr"]


def test_exposed_and_referenced_names_are_parsed_as_meant() -> None:
    page = (
        "# HELP apix_x_total X\n# TYPE apix_x_total counter\napix_x_total 1.0\n"
        "# TYPE apix_x_created gauge\napix_x_created 1.7e9\n"
        '# TYPE apix_h_seconds histogram\napix_h_seconds_bucket{le="+Inf"} 0.0\n'
    )
    assert exposed_metric_names(page) == {"apix_x_total", "apix_h_seconds"}
    assert referenced_metric_names(
        ["histogram_quantile(0.5, rate(apix_h_seconds_bucket[5m])) + apix_x_total"]
    ) == {"apix_h_seconds", "apix_x_total"}


@pytest.fixture
def promtool() -> str:
    assert PROMTOOL is not None, "promtool is needed (scripts/test.sh installs Debian's prometheus)"
    return PROMTOOL


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=PROMETHEUS, capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_accepts_the_alerting_rules(promtool: str) -> None:
    result = _run([promtool, "check", "rules", "alerts.yml"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout + result.stderr


def test_the_promised_alerts_are_there() -> None:
    text = (PROMETHEUS / "alerts.yml").read_text()
    assert set(re.findall(r"^\s+- alert: (\w+)$", text, re.MULTILINE)) == EXPECTED_ALERTS


def test_promtool_unit_tests_of_the_alerts(promtool: str) -> None:
    result = _run([promtool, "test", "rules", "alerts.test.yml"])
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts.test.yml").read_text()))
    assert tested == EXPECTED_ALERTS


def test_promtool_unit_tests_can_fail(promtool: str, tmp_path: Path) -> None:
    """A wrong expectation is reported: the unit tests above are not vacuous."""
    (tmp_path / "alerts.yml").write_text((PROMETHEUS / "alerts.yml").read_text())
    wrong = (PROMETHEUS / "alerts.test.yml").read_text().replace("is down", "is fine")
    (tmp_path / "alerts.test.yml").write_text(wrong)
    result = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "ApixNodeDown" in result.stdout + result.stderr


def test_promtool_accepts_the_example_configuration(promtool: str) -> None:
    result = _run([promtool, "check", "config", "prometheus.example.yml"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_name_only_exposed_metrics() -> None:
    text = (PROMETHEUS / "alerts.yml").read_text()
    names = referenced_metric_names([line for line in text.splitlines() if "expr:" in line])
    metrics_source = (REPO / "apix_trio" / "observability" / "metrics.py").read_text()
    for name in names:
        base = name.removesuffix("_total")
        assert f'"{base}"' in metrics_source, name
