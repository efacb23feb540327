"""deploy/prometheus and deploy/grafana: the alerts are valid and unit-tested (promtool), every
expression names only series tasklane serves, and compose's `observability` profile wires them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from persistence.repositories.gauge_repository import DueGauge, QueueGauges
from tests.support.deployment import ROOT_PATH, compose_config
from tests.support.tools import missing
from worker.exporter import families
from worker.metrics import WorkerMetrics

PROMETHEUS = ROOT_PATH / "deploy" / "prometheus"
DASHBOARD = ROOT_PATH / "deploy" / "grafana" / "tasklane.json"
SERIES_NAME = re.compile(r"\btasklane_[a-z_]+\b")


def promtool(*args: str, cwd: Path = PROMETHEUS) -> str:
    tool = shutil.which("promtool")
    if tool is None:
        missing("promtool", "apt-get install --no-install-recommends prometheus")
    done = subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def served_series() -> set[str]:
    """Every sample name a worker's /metrics and `tasklane metrics` can serve."""
    worker = WorkerMetrics("q", frozenset({"a"}))
    worker.runs_started.labels("q", "a").inc()
    worker.runs_finished.labels("q", "a", "completed").inc()
    worker.run_duration.labels("q", "a").observe(1)
    worker.queue_wait.labels("q", "a").observe(1)
    worker.backend_errors.labels("postgres", "claim").inc()
    worker.reconcile_failures.labels("q", "rescue").inc()
    worker.watch_slots(1, lambda: 0)
    names = {s.name for family in worker.registry.collect() for s in family.samples}
    gauges = QueueGauges([DueGauge("q", "a", 1, 1.0)], {"q": 1}, {"q": 1})
    names |= {s.name for family in families(gauges) for s in family.samples}
    return names | {"tasklane_exporter_up"}


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    return exprs


def test_the_alerts_and_the_scrape_config_are_valid() -> None:
    assert "SUCCESS: 5 rules found" in promtool("check", "rules", "alerts.yaml")
    promtool("check", "config", "prometheus.yml")


def test_the_alerts_pass_their_unit_tests() -> None:
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yaml")


def test_every_alert_fires_in_a_unit_test_and_is_named_in_the_readme() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts.test.yaml").read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    readme = (ROOT_PATH / "README.md").read_text()
    for rule in alert_rules():
        assert rule["alert"] in fired, f"{rule['alert']} has no promtool test where it fires"
        assert rule["alert"] in readme, f"{rule['alert']} is not in the README"


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_expression_reads_series_that_are_served(source: str) -> None:
    exprs = (
        [rule["expr"] for rule in alert_rules()] if source == "alerts" else dashboard_expressions()
    )
    served = served_series()
    for expr in exprs:
        named = set(SERIES_NAME.findall(expr))
        assert named, expr
        assert named <= served, f"{sorted(named - served)} not served; in {expr}"


def test_the_dashboard_has_the_panels_operators_look_for() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " | ".join(panel["title"].lower() for panel in dashboard["panels"])
    for wanted in ("throughput", "queue lag", "wait percentiles", "run duration", "slots"):
        assert wanted in titles, wanted
    assert "rescue" in titles
    datasource = yaml.safe_load(
        (ROOT_PATH / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text()
    )["datasources"][0]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"]


def test_the_observability_profile_wires_prometheus_and_grafana_on_loopback_only() -> None:
    services = compose_config(profiles=("observability",))["services"]
    optional = {name for name, service in services.items() if service.get("profiles")}
    assert optional == {"metrics", "prometheus", "grafana"}
    assert all(services[name]["profiles"] == ["observability"] for name in optional)
    assert services["metrics"]["command"][:2] == ["tasklane", "metrics"]
    for name in ("prometheus", "grafana"):
        for port in services[name]["ports"]:
            host_ip = port["host_ip"] if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", (name, port)
    mounts = json.dumps(services["prometheus"]["volumes"]) + json.dumps(
        services["grafana"]["volumes"]
    )
    assert "deploy/prometheus" in mounts
    assert "deploy/grafana/tasklane.json" in mounts
    scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    assert jobs["tasklane-metrics"]["static_configs"][0]["targets"] == ["metrics:9465"]
    assert jobs["tasklane-worker"]["dns_sd_configs"][0]["names"] == ["worker"]
