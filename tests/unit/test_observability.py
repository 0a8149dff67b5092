"""deploy/grafana and deploy/prometheus speak only of metrics goleash exports: the
names are taken from the collectors themselves (agent and control plane, every
family filled), not from a hand-written list; and one metrics port everywhere."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from goleash.control.engine_stats import EngineCounts
from goleash.control.metrics import ControlCollector, ControlView
from goleash.node import DEFAULT_METRICS_LISTEN
from goleash.node.metrics import AgentCollector, AgentView, FunctionView, ProcessView, SiteView
from goleash.probes import hist

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "goleash-dashboard.json"
RULES = REPO / "deploy" / "prometheus" / "goleash-rules.yaml"
PROMQL_WORDS = {
    "sum", "max", "min", "count", "avg", "by", "without", "and", "or", "unless", "rate",
    "increase", "delta", "deriv", "topk", "histogram_quantile", "le", "on", "ignoring",
}  # fmt: skip


def _names(registry: CollectorRegistry) -> set[str]:
    text = generate_latest(registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def exported() -> set[str]:
    """Every sample name the agent and the control plane serve, with data in each."""
    counts = [0] * hist.N_BUCKETS
    counts[hist.bucket_of(5000)] = 1
    proc = ProcessView(
        pid=1, service="s", mode="probes", goroutines=1,
        sites=[SiteView("main.f", "/b/m/f.go:1", 1, 1, 1, 1)], probe_hits={"create_hits": 1},
        dropped={"full": 1}, functions=[FunctionView("main.f", counts, 1, 5000)],
        panics={"main.f": 1},
    )  # fmt: skip
    agent = AgentView([proc], 1, 1, 1, {"buffer_full": 1}, 1, True, {"not_go": 1}, 1)
    engine = EngineCounts(
        Counter({("r", "DEGRADE", "enforce"): 1}), Counter({("file", "ok"): 1}),
        Counter({("file", "error"): 1}), 1, 1, 0.01, [1] * 15,
    )  # fmt: skip
    control = ControlView(
        agents=Counter(connected=1), processes=Counter(running=1), goroutines={"s": 1},
        orphans=Counter(s=1), suspects=Counter(s=1), batches=1, duplicates=1, gaps=1,
        events=1, levels={("s", "r"): 1}, engine=engine,
    )  # fmt: skip
    names: set[str] = set()
    for collector in (AgentCollector(lambda: agent), ControlCollector(lambda: control)):
        reg = CollectorRegistry()
        ProcessCollector(registry=reg)
        reg.register(collector)
        names |= _names(reg)
    return names


def _metric_names(expr: str) -> set[str]:
    expr = re.sub(r"\{[^}]*\}", "{}", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)  # ranges
    expr = re.sub(r"(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {w for w in words if w not in PROMQL_WORDS and "_" in w}


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    for var in dash["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict):
            exprs.append(re.sub(r"label_values\((\w+),.*\)", r"\1", q["query"]))
    return exprs


def _rule_exprs() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    assert doc["kind"] == "PrometheusRule" and doc["apiVersion"] == "monitoring.coreos.com/v1"
    rules = [r for g in doc["spec"]["groups"] for r in g["rules"]]
    assert all(r["alert"] and r["labels"]["severity"] for r in rules)
    return [r["expr"] for r in rules]


def test_the_collectors_export_the_promised_families() -> None:
    names = exported()
    for name in (
        "goleash_build_info", "goleash_goroutines_live", "goleash_policy_level",
        "goleash_policy_decisions_total", "goleash_policy_action_failures_total",
        "goleash_policy_evaluation_seconds_bucket", "goleash_function_latency_seconds_bucket",
    ):  # fmt: skip
        assert name in names


def test_dashboard_queries_use_only_exported_metrics() -> None:
    names, used = exported(), set()
    for expr in _dashboard_exprs():
        found = _metric_names(expr)
        assert found, f"no metric in {expr!r}"
        assert found <= names, f"{expr!r} uses {found - names}, not exported by goleash"
        used |= found
    assert len(used) >= 15  # the dashboard covers agent, control plane and policy


def test_alert_rules_use_only_exported_metrics() -> None:
    names = exported()
    for expr in _rule_exprs():
        found = _metric_names(expr)
        assert found and found <= names, f"{expr!r} uses {found - names}"


def test_the_extractor_sees_a_metric_goleash_does_not_export() -> None:
    assert _metric_names('sum by (service) (rate(goleash_nope_total{a="b"}[5m])) > 0') == {
        "goleash_nope_total"
    }


def test_one_metrics_port_locally_and_in_the_manifests() -> None:
    port = DEFAULT_METRICS_LISTEN.rsplit(":", 1)[1]
    for name in ("agent.yaml", "control-plane.yaml"):
        text = (REPO / "deploy" / "kubernetes" / name).read_text()
        assert f"0.0.0.0:{port}" in text and f"containerPort: {port}" in text, name
        assert "9090" not in text, name
