"""The Grafana dashboard and the alert rules against what the worker really exports.

- The dashboard is current-schema Grafana JSON with a Prometheus datasource variable.
- Every PromQL expression (dashboard targets, variable queries, alert rules) parses (promql-parser).
- Every series they reference appears in a LIVE scrape of `/metrics` from a running worker (sandbox +
  real broker, traffic handled): names come from the exposition, not from a hand-written list.
- Every exported metric family is documented in docs/observability.md.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support import scrape, wait_for
from tests.support.harness import observed_worker

ROOT = Path(__file__).resolve().parents[2]
FILES = ROOT / "helm" / "ingest" / "files"
DASHBOARD = FILES / "grafana-dashboard.json"
RULES = FILES / "prometheus-rules.yaml"
DOCS = ROOT / "docs" / "observability.md"

# Series that Prometheus itself writes for every scrape target (the worker cannot export them).
PROMETHEUS_SYNTHETIC = {"up"}

# Grafana's built-in interval variables -> a duration PromQL accepts; any other $var -> a literal.
GRAFANA_INTERVALS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
VARIABLE = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\[\[(\w+)\]\]|\$(\w+)")
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


def substitute(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        return GRAFANA_INTERVALS.get(name, "x")

    return VARIABLE.sub(value, expr)


def metric_names(node: Any) -> Iterator[str]:
    """Every metric name selected anywhere in a parsed PromQL expression."""
    if isinstance(node, promql_parser.VectorSelector):
        if node.name:
            yield node.name
        for matcher in node.matchers.matchers:
            if matcher.name == "__name__":
                assert str(matcher.op).endswith("Equal") and "Not" not in str(matcher.op), (
                    f"select metrics by explicit name, not {matcher.op} on __name__")
                yield matcher.value
    elif isinstance(node, promql_parser.MatrixSelector):
        yield from metric_names(node.vector_selector)
    elif isinstance(node, promql_parser.Call):
        for arg in node.args:
            yield from metric_names(arg)
    elif isinstance(node, promql_parser.AggregateExpr):
        yield from metric_names(node.expr)
        if node.param is not None:
            yield from metric_names(node.param)
    elif isinstance(node, promql_parser.BinaryExpr):
        yield from metric_names(node.lhs)
        yield from metric_names(node.rhs)
    elif isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr | promql_parser.SubqueryExpr):
        yield from metric_names(node.expr)


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))  # collapsed rows hold their panels


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) for every target and every label_values variable query."""
    exprs = []
    for panel in all_panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            exprs.append((f"panel {panel['id']} {panel['title']!r} target {target['refId']}", target["expr"]))
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = LABEL_VALUES.match(query)
            assert match, f"variable {variable['name']}: expected label_values(selector, label), got {query!r}"
            exprs.append((f"variable {variable['name']}", match["selector"]))
    return exprs


def rule_exprs() -> list[tuple[str, str]]:
    doc = yaml.safe_load(RULES.read_text())
    return [(f"rule {rule.get('alert') or rule.get('record')}", rule["expr"])
            for group in doc["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def exported(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Series names a worker exports -> their family, from a live scrape over HTTP of a running worker
    (sandbox + real broker) that has handled good and malformed notifications."""
    directory = tmp_path_factory.mktemp("exported")
    with observed_worker(directory, kafka_bootstrap, f"dash-{uuid.uuid4().hex[:8]}") as (worker, sandbox):
        wait_for(lambda: len(worker.intake.pubnub.reading()) == 3, 30, what="the worker reading PubNub")
        sandbox.generator.publish(30)
        sandbox.generator.publish(3, malformed="bad-padding")
        wait_for(lambda: worker.metrics.received_by_transport["pubnub"]._value.get() >= 33, 30, what="traffic handled")
        text = scrape(worker.health.port)
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                "summary": ["", "_sum", "_count", "_created"], "gauge": [""], "info": ["_info"],
                "unknown": [""], "untyped": [""]}
    names: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        for suffix in suffixes[family.type]:
            names[family.name + suffix] = family.name
        for sample in family.samples:
            names[sample.name] = family.name
    assert len(names) > 30, text  # the scrape really held the worker's metrics
    return names


def test_dashboard_is_current_schema_grafana() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 39
    assert board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    datasource = variables["datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    for name in ("job", "namespace", "pod", "account"):
        assert variables[name]["type"] == "query", name
        assert variables[name]["datasource"]["uid"] == "${datasource}", name

    ids: set[int] = set()
    cells: set[tuple[int, int]] = set()
    for panel in all_panels(board["panels"]):
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        assert isinstance(panel["id"], int) and panel["id"] not in ids, where
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")), where
        assert grid["x"] + grid["w"] <= 24, where
        taken = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not taken & cells, f"{where} overlaps another panel"
        cells |= taken
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["targets"], where
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        for target in panel["targets"]:
            assert target["refId"] and target["expr"], where
            assert target["datasource"]["uid"] == "${datasource}", where


def test_panels_filter_by_the_dashboard_variables() -> None:
    for where, expr in dashboard_exprs():
        if where.startswith("panel"):
            for variable in ("$job", "$namespace", "$pod"):
                assert variable in expr, f"{where} ignores {variable}: {expr}"


@pytest.mark.parametrize(("where", "expr"), dashboard_exprs() + rule_exprs())
def test_promql_parses_and_uses_only_exported_series(where: str, expr: str, exported: dict[str, str]) -> None:
    parsed = promql_parser.parse(substitute(expr))
    names = set(metric_names(parsed))
    assert names, f"{where}: selects no metric: {expr}"
    unknown = names - exported.keys() - PROMETHEUS_SYNTHETIC
    assert not unknown, f"{where}: not exported by the worker: {sorted(unknown)}"


def test_the_parser_catches_what_these_tests_rely_on(exported: dict[str, str]) -> None:
    """Guards against a check that cannot fail: broken PromQL raises, unknown names are seen."""
    with pytest.raises(ValueError):
        promql_parser.parse(substitute("sum(rate(ingest_lag_seconds_bucket[$__rate_interval])"))
    names = set(metric_names(promql_parser.parse(substitute(
        'histogram_quantile(0.9, sum by (le) (rate(ingest_lag_seconds_bucket{pod=~"$pod"}[$__rate_interval])))'
        " / on() group_left() max(ingest_lag_secondz)"))))
    assert names == {"ingest_lag_seconds_bucket", "ingest_lag_secondz"}
    assert "ingest_lag_secondz" not in exported
    assert substitute('x{a=~"${pod}", b=~"[[ns]]"}[$__rate_interval]') == 'x{a=~"x", b=~"x"}[5m]'


def test_every_exported_metric_is_documented(exported: dict[str, str]) -> None:
    docs = DOCS.read_text()
    families = set(exported.values())
    for family in sorted(families):
        if family.endswith("_created") and family.removesuffix("_created") in families:
            continue  # text format 0.0.4 exposes a counter's/histogram's creation time as its own gauge
        documented = family if f"`{family}`" in docs else f"{family}_total"
        assert f"`{documented}`" in docs, f"{family} is not documented in docs/observability.md"


def test_dashboard_shows_what_the_operators_asked_for() -> None:
    """The panels the issue lists: throughput, lag percentiles, minimum expiry, renewal outcomes,
    dead letters by reason, RingCentral errors and 429s, PubNub status, producer queue."""
    used = {name for _, expr in dashboard_exprs() for name in metric_names(promql_parser.parse(substitute(expr)))}
    wanted = {
        "ingest_notifications_published_total", "ingest_lag_seconds_bucket", "ingest_internal_latency_seconds_bucket",
        "ingest_subscription_expiry_min_seconds", "ingest_subscription_expiry_seconds",
        "ingest_subscription_renewals_total", "ingest_subscription_creations_total",
        "ingest_notifications_dead_lettered_total", "ingest_ringcentral_api_calls_total",
        "ingest_ringcentral_rate_limit_penalties_total", "ingest_pubnub_status_total",
        "ingest_kafka_producer_queue_messages", "ingest_kafka_delivery_errors_total",
        "ingest_last_notification_timestamp_seconds", "ingest_subscriptions", "ingest_token_refreshes_total",
    }
    assert wanted - used == set()
