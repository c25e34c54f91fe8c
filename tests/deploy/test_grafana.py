"""The Grafana dashboard, statically: the JSON is what build_dashboard.py generates, it has the
latency, throughput, scheduler, KV-cache, prefix-cache and thinking panels an operator needs,
and every query uses only documented metrics and the model_name variable. (test_dashboard.py
evaluates the queries against a real server.)"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana"
# Exported by the server in addition to docs/metrics.md (HTTP layer).
EXTRA_METRICS = {"itt_http_requests_total"}


def builder():
    spec = importlib.util.spec_from_file_location("build_dashboard", GRAFANA / "build_dashboard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def dashboard() -> dict:
    return json.loads((GRAFANA / "dashboards" / "itt-server.json").read_text())


def test_json_is_generated():
    assert (GRAFANA / "dashboards" / "itt-server.json").read_text() == builder().render(), \
        "run: python deploy/grafana/build_dashboard.py"


def test_has_the_latency_scheduler_and_thinking_panels():
    titles = {p["title"] for p in dashboard()["panels"]}
    wanted = {"Time to first token", "Inter-token latency", "E2E request latency",
              "Token throughput", "Scheduler state", "KV cache usage", "Finish reason",
              "Queue time", "Thinking depth distribution", "Requested think budgets",
              "Routed fraction per layer and step", "Compute spent vs maximum",
              "Compute saved by routing", "Prefix cache hit rate"}
    assert wanted <= titles
    kinds = {p["title"]: p["type"] for p in dashboard()["panels"]}
    assert kinds["Thinking depth distribution"] == "heatmap"


def test_queries_use_documented_metrics_and_the_model_variable():
    documented = set(re.findall(r"`(itt_[a-z0-9_]+)`", (REPO / "docs" / "metrics.md").read_text()))
    documented |= EXTRA_METRICS
    variables = {v["name"] for v in dashboard()["templating"]["list"]}
    assert {"model_name", "datasource"} <= variables
    for p in dashboard()["panels"]:
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        for t in p["targets"]:
            expr = t["expr"]
            for name in re.findall(r"\b(itt_[a-z0-9_]+?)(?:_bucket|_sum|_count)?\{", expr):
                assert name in documented, f"{p['title']}: {name} is not a documented metric"
            n_selectors = len(re.findall(r"\bitt_[a-z0-9_]+\{", expr))
            assert expr.count('model_name="$model_name"') == n_selectors, p["title"]
