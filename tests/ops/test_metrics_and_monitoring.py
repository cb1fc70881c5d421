"""Prometheus metrics endpoint, and the monitoring/deployment files refer only to metrics that exist."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import yaml

from ops import metrics

OPS = Path(__file__).resolve().parents[2] / "ops"
METRIC_RE = re.compile(r"\b(carepay_[a-z_]+?)(?:_bucket|_total|_count|_sum)?\b")


def _defined_metric_names() -> set[str]:
    import importlib

    # every module that defines metrics, imported here (not left to other tests): they join the same registry
    for module in ("clearing.metrics", "clearing.pipeline.metrics"):
        importlib.import_module(module)

    return {family.name for family in metrics.REGISTRY.collect()}


def test_metrics_endpoint_serves_carepay_metrics() -> None:
    server = metrics.start_metrics_server(0)
    try:
        metrics.observe_auth("purchase", "00", 0.004)
        metrics.count_bad_input("message", "malformed")
        body = urllib.request.urlopen(server.url, timeout=5).read().decode()
    finally:
        server.close()
    assert 'carepay_auth_requests_total{code="00",type="purchase"}' in body
    assert "carepay_auth_latency_seconds_bucket" in body
    assert 'carepay_bad_input_total{reason="malformed",source="message"}' in body


def test_terminal_helpers() -> None:
    from types import SimpleNamespace

    before = metrics.sample_value("carepay_terminal_transactions_total", {"type": "purchase", "outcome": "approved"})
    metrics.observe_terminal_outcome("purchase", "approved", 0.02)
    after = metrics.sample_value("carepay_terminal_transactions_total", {"type": "purchase", "outcome": "approved"})
    assert after == (before or 0) + 1
    journal = SimpleNamespace(reversal_queue=lambda: [1, 2], offline_queue=lambda: [1])
    metrics.refresh_terminal_gauges(journal, connected=False)
    assert metrics.sample_value("carepay_terminal_backlog", {"queue": "reversal"}) == 2
    assert metrics.sample_value("carepay_terminal_backlog", {"queue": "offline_advice"}) == 1
    assert metrics.sample_value("carepay_terminal_offline") == 1


def test_get_or_create_shares_and_checks_labels() -> None:
    again = metrics.counter("carepay_auth_requests", "x", ("type", "code"))
    assert again is metrics.AUTH_REQUESTS
    import pytest

    with pytest.raises(ValueError):
        metrics.counter("carepay_auth_requests", "x", ("other",))


def test_names_follow_prometheus_conventions() -> None:
    for name in _defined_metric_names():
        if not name.startswith("carepay_"):
            continue
        assert re.fullmatch(r"carepay_[a-z][a-z0-9_]*", name), name
        assert not name.endswith("_total"), name  # the client appends _total to counters


def test_alert_rules_valid_and_use_defined_metrics() -> None:
    doc = yaml.safe_load((OPS / "monitoring" / "carepay-alerts.yml").read_text())
    names = _defined_metric_names()
    alerts = [r for g in doc["groups"] for r in g["rules"]]
    assert {"CarepayErrorCasesOverdue", "CarepayMacFailures", "CarepayReversalRateHigh",
            "CarepayQueueDepthHigh"} <= {a["alert"] for a in alerts}
    for rule in alerts:
        assert rule["expr"] and rule["labels"]["severity"] in ("warning", "critical")
        for used in METRIC_RE.findall(rule["expr"]):
            assert used in names, f"{rule['alert']} uses unknown metric {used}"


def test_grafana_dashboard_valid_and_uses_defined_metrics() -> None:
    dash = json.loads((OPS / "monitoring" / "grafana-dashboard.json").read_text())
    names = _defined_metric_names()
    assert dash["panels"] and dash["uid"]
    for panel in dash["panels"]:
        for target in panel["targets"]:
            for used in METRIC_RE.findall(target["expr"]):
                assert used in names, f"panel {panel['title']!r} uses unknown metric {used}"


def test_systemd_units_well_formed() -> None:
    import configparser

    units = sorted((OPS / "deploy" / "systemd").glob("*.service"))
    assert len(units) >= 3
    for unit in units:
        cp = configparser.ConfigParser(strict=False, interpolation=None)
        cp.optionxform = str  # type: ignore[assignment,method-assign]
        cp.read_string(unit.read_text())
        assert cp.has_section("Unit") and cp.has_section("Service"), unit.name
        assert cp["Service"]["ExecStart"].split()[0].startswith("/"), unit.name
    clearing = (OPS / "deploy" / "systemd" / "carepay-clearing@.service").read_text()
    assert "clearing serve" in clearing and "%i" in clearing
