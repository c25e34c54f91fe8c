"""The proof that the Grafana dashboard works: a real itt-server (tiny model) under live traffic,
a real Prometheus scraping it every second, and every panel's PromQL from
deploy/grafana/dashboards/itt-server.json evaluated through Prometheus' HTTP API, each required
to return a non-empty, finite result. Also checks that the metrics the alerts and the HPA use
exist on the live server."""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from live_server import MODEL_NAME, query, running_prometheus, running_server

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "itt-server.json"
SCRAPE_S = 1
# What Grafana would substitute for a narrow time range: $__interval, and $__rate_interval =
# max($__interval + scrape interval, 4 * scrape interval).
INTERVAL_S = 5
RATE_INTERVAL_S = max(INTERVAL_S + SCRAPE_S, 4 * SCRAPE_S)

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="prometheus not installed")


def substitute(expr: str) -> str:
    return (expr.replace("$model_name", MODEL_NAME)
            .replace("$__rate_interval", f"{RATE_INTERVAL_S}s")
            .replace("$__interval", f"{INTERVAL_S}s"))


def panel_queries() -> list[tuple[str, str]]:
    """(panel title / refId, PromQL) of every query of every panel."""
    out = []
    for p in json.loads(DASHBOARD.read_text())["panels"]:
        for t in p.get("targets", []):
            out.append((f"{p['title']} / {t['refId']}", t["expr"]))
    return out


# Every prompt starts with this (three KV blocks), so that requests at the same budget hit the
# prefix cache and the hit-rate panel has something to show.
SHARED_PREFIX = ("In the beginning God created the heaven and the earth. And the earth was "
                 "without form, and void; and darkness was upon the face of the deep.")


TOOLS = [{"type": "function", "function": {"name": "roll", "parameters": {
    "type": "object", "properties": {"sides": {"type": "integer", "enum": [6, 20]}}}}}]


class Traffic(threading.Thread):
    """Keeps requests flowing (mixed budgets, streaming or not, completions and chat, and one
    bad request per round for a 4xx) until stopped, so every rate() window has increases. The
    prompts share a prefix, so the prefix cache hits."""

    def __init__(self, base_url: str) -> None:
        super().__init__(daemon=True)
        self.base_url, self.done, self.sent, self.errors = base_url, threading.Event(), 0, []

    def run(self) -> None:
        budgets = itertools.cycle([0.0, 0.5, 1.0, None])
        with httpx.Client(base_url=self.base_url, timeout=60) as http:
            for i in itertools.count():
                if self.done.is_set():
                    return
                body = {"model": MODEL_NAME, "max_tokens": 6 + i % 5,
                        "temperature": 0.0, "stream": i % 2 == 0, "return_thinking": True}
                budget = next(budgets)
                if budget is not None:
                    body["think_budget"] = budget
                if i % 3 == 2:
                    path = "/v1/chat/completions"
                    body["messages"] = [{"role": "system", "content": SHARED_PREFIX},
                                        {"role": "user", "content": f"tell me story {i}"}]
                    if i % 2:                   # the tool-calling panel's series
                        body["tools"], body["tool_choice"] = TOOLS, "required"
                else:
                    path = "/v1/completions"
                    body["prompt"] = f"{SHARED_PREFIX} Once upon a time, number {i}, there was"
                try:
                    resp = http.post(path, json=body)
                    self.sent += 1
                    if resp.status_code != 200:
                        self.errors.append((resp.status_code, resp.text[:200]))
                    if i % 4 == 3:   # out-of-range budget: the 4xx series of the status panel
                        http.post("/v1/completions", json={**body, "think_budget": 2.0,
                                                           "prompt": "x", "stream": False})
                except httpx.HTTPError as exc:
                    self.errors.append((type(exc).__name__, str(exc)))


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    """(server URL, Prometheus URL) with traffic flowing and several scrapes taken."""
    work = tmp_path_factory.mktemp("dashboard")
    # Speculation and tool calling on, so that their panels have data too.
    with running_server(tiny_model_dir, work, "--speculative-config",
                        '{"method": "itt_self", "num_speculative_tokens": 3}',
                        "--enable-auto-tool-choice", "--tool-call-parser", "hermes") as server:
        server_url = server.url
        target = server_url.removeprefix("http://")
        with running_prometheus(target, work, SCRAPE_S) as prom_url:
            traffic = Traffic(server_url)
            traffic.start()
            try:
                wait_for_scrapes(prom_url, traffic)
                yield server_url, prom_url
            finally:
                traffic.done.set()
                traffic.join(timeout=60)


def wait_for_scrapes(prom_url: str, traffic: Traffic, timeout_s: float = 90) -> None:
    """Until Prometheus has seen generated tokens grow over a whole rate window."""
    sel = f'{{model_name="{MODEL_NAME}"}}'
    expr = (f"min_over_time(itt_generation_tokens_total{sel}[{RATE_INTERVAL_S + 2}s])"
            f" > 0 and count_over_time(itt_generation_tokens_total{sel}"
            f"[{RATE_INTERVAL_S + 2}s]) >= {RATE_INTERVAL_S + 1}")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert not traffic.errors, traffic.errors[:5]
        if query(prom_url, expr)["result"]:
            return
        time.sleep(SCRAPE_S)
    raise AssertionError(f"no scraped traffic after {timeout_s} s ({traffic.sent} requests sent)")


def values(data: dict) -> list[float]:
    if data["resultType"] == "scalar":
        return [float(data["result"][1])]
    if data["resultType"] == "vector":
        return [float(s["value"][1]) for s in data["result"]]
    return [float(v[1]) for s in data["result"] for v in s["values"]]


def test_every_panel_query_returns_finite_data(live):
    _, prom_url = live
    queries = panel_queries()
    assert len(queries) >= 30
    bad = []
    for name, expr in queries:
        data = query(prom_url, substitute(expr))
        vals = values(data)
        if not vals:
            bad.append(f"{name}: empty result for {substitute(expr)}")
        elif not all(math.isfinite(v) for v in vals):
            bad.append(f"{name}: non-finite {vals} for {substitute(expr)}")
    assert not bad, "\n".join(bad)


def test_the_prefix_cache_panel_shows_hits(live):
    _, prom_url = live
    [(_, expr)] = [(n, e) for n, e in panel_queries() if n.startswith("Prefix cache hit rate")]
    vals = values(query(prom_url, substitute(expr)))
    assert vals and all(0 < v <= 1 for v in vals), vals


def test_alert_and_autoscaling_metrics_exist(live):
    _, prom_url = live
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    hpa = yaml.safe_load((REPO / "deploy" / "k8s" / "hpa.yaml").read_text())
    names = {m for e in exprs for m in re.findall(r"\bitt_[a-z0-9_]+", e)}   # series names
    names |= {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    missing = [n for n in sorted(names) if not query(prom_url, f"count({n})")["result"]]
    assert not missing, f"not exported by the server: {missing}"
    up = query(prom_url, 'up{job="itt-server"}')["result"]
    assert [float(s["value"][1]) for s in up] == [1.0]
