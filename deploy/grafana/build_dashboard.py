"""Generates dashboards/itt-server.json, the Grafana dashboard for itt-server.

The JSON is what Grafana provisions; this file is its readable source (one line per panel).
Regenerate after editing: `python deploy/grafana/build_dashboard.py`. tests/deploy/
test_dashboard.py checks the two agree and evaluates every panel's PromQL against a real server.

Serving panels follow vLLM's reference dashboard (metrics renamed vllm: -> itt_, docs/metrics.md);
the ITT panels show where the model spends its inner thinking.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "itt-server.json"
SEL = 'model_name="$model_name"'
DS = {"type": "prometheus", "uid": "${datasource}"}
WIDTH, HEIGHT = 12, 8          # two panels per row of the 24-column grid


def rate(metric: str, extra: str = "") -> str:
    sel = SEL + (", " + extra if extra else "")
    return f"rate({metric}{{{sel}}}[$__rate_interval])"


def quantiles(hist: str) -> list[tuple[str, str]]:
    """p99/p90/p50 and the mean of a histogram, summed over replicas."""
    out = [(f"histogram_quantile({q}, sum by (le) ({rate(hist + '_bucket')}))", f"p{int(q * 100)}")
           for q in (0.99, 0.9, 0.5)]
    out.append((f"sum({rate(hist + '_sum')}) / sum({rate(hist + '_count')})", "mean"))
    return out


def heatmap_of(hist: str) -> list[tuple[str, str]]:
    """Per-bucket counts in each interval: Grafana's heatmap of a classic histogram."""
    return [(f"sum by (le) (increase({hist}_bucket{{{SEL}}}[$__rate_interval]))", "{{le}}")]


# (title, panel type, unit, [(PromQL, legend)], description)
SERVING = [
    ("E2E request latency", "timeseries", "s", quantiles("itt_e2e_request_latency_seconds"),
     "Arrival to finish, per request."),
    ("Time to first token", "timeseries", "s", quantiles("itt_time_to_first_token_seconds"),
     "Arrival to the first output token (queueing + prefill)."),
    ("Inter-token latency", "timeseries", "s", quantiles("itt_inter_token_latency_seconds"),
     "Time between consecutive output tokens of a request."),
    ("Time per output token", "timeseries", "s", quantiles("itt_time_per_output_token_seconds"),
     "Per request: (e2e - ttft) / (output tokens - 1)."),
    ("Elastic thinking: budget applied vs requested", "timeseries", "short", [
        (f"min(itt_elastic_think_scale{{{SEL}}})", "scale (min over replicas)"),
        (f"sum({rate('itt_request_applied_think_budget_sum')})"
         f" / sum({rate('itt_request_applied_think_budget_count')})", "mean applied budget"),
        (f"sum({rate('itt_request_think_budget_sum')})"
         f" / sum({rate('itt_request_think_budget_count')})", "mean requested budget")],
     "With --elastic-thinking, requests that give min_think_budget think less when the "
     "latency targets are missed: a scale below 1 next to flat latency panels means latency "
     "held because thinking dropped."),
    ("Elastic thinking: steps below the requested budget", "timeseries", "short", [
        (f"sum({rate('itt_elastic_reduced_steps_total')})", "reduced steps/s")],
     "Engine steps run with elastic requests below their requested budget (alerted on when "
     "it lasts: capacity is short)."),
    ("Token throughput", "timeseries", "tokens/s", [
        (f"sum({rate('itt_prompt_tokens_total')})", "prompt tokens/s"),
        (f"sum({rate('itt_generation_tokens_total')})", "generation tokens/s")],
     "Prompt and generated tokens per second, all replicas."),
    ("Request throughput", "timeseries", "reqps", [
        (f"sum({rate('itt_request_success_total')})", "finished requests/s")],
     "Finished requests per second (any finish reason)."),
    ("Scheduler state", "timeseries", "short", [
        (f"sum(itt_num_requests_running{{{SEL}}})", "running"),
        (f"sum(itt_num_requests_waiting{{{SEL}}})", "waiting")],
     "Requests in the running batch and in the queue. The HPA scales on waiting per pod."),
    ("KV cache usage", "timeseries", "percentunit", [
        (f"max(itt_kv_cache_usage_perc{{{SEL}}})", "max over replicas"),
        (f"avg(itt_kv_cache_usage_perc{{{SEL}}})", "mean over replicas")],
     "Fraction of KV blocks in use. Near 1 means preemptions (recompute)."),
    ("Finish reason", "timeseries", "short", [
        (f"sum by (finished_reason) (increase(itt_request_success_total{{{SEL}}}"
         "[$__rate_interval]))", "{{finished_reason}}")],
     "stop: stop token or string; length: max_tokens; abort: cancelled or drained."),
    ("Queue time", "timeseries", "s", quantiles("itt_request_queue_time_seconds"),
     "Arrival to first scheduled."),
    ("Prefill vs decode time", "timeseries", "s", [
        (f"histogram_quantile(0.5, sum by (le) "
         f"({rate('itt_request_prefill_time_seconds_bucket')}))", "prefill p50"),
        (f"histogram_quantile(0.5, sum by (le) "
         f"({rate('itt_request_decode_time_seconds_bucket')}))", "decode p50")],
     "Per request: first scheduled to first token (prefill), first token to finish (decode)."),
    ("Tokens per engine step", "timeseries", "short", [
        (f"sum({rate('itt_iteration_tokens_sum')}) / sum({rate('itt_iteration_tokens_count')})",
         "mean tokens / step")],
     "How full the engine's steps are: the token budget used per step."),
    ("Process memory", "timeseries", "bytes", [
        # Process metrics have no model label: keep the instances that serve the model.
        (f"sum by (instance) (process_resident_memory_bytes"
         f" and on (instance) itt_num_kv_blocks{{{SEL}}})", "{{instance}}")],
     "Resident memory of each replica's server process."),
    ("Request prompt length", "heatmap", "short", heatmap_of("itt_request_prompt_tokens"),
     "Prompt tokens per request."),
    ("Request generation length", "heatmap", "short",
     heatmap_of("itt_request_generation_tokens"), "Output tokens per request."),
    ("Prefix cache hit rate", "timeseries", "percentunit", [
        (f"sum({rate('itt_prefix_cache_hits_total')})"
         f" / sum({rate('itt_prefix_cache_queries_total')})", "hit rate")],
     "Prompt tokens served from the prefix cache / prompt tokens looked up. Only requests at "
     "the same think budget share a prefix."),
    ("Preemptions", "timeseries", "short", [
        (f"sum({rate('itt_num_preemptions_total')})", "preemptions/s")],
     "Sequences evicted from the KV cache and recomputed later."),
    ("Tool calling", "timeseries", "reqps", [
        (f"sum by (tool_choice) ({rate('itt_tool_call_requests_total')})", "{{tool_choice}}"),
        (f"sum({rate('itt_tool_call_parse_failures_total')})", "parse failures")],
     "Chat requests with tools by tool_choice, and calls the 'auto' parser could not read "
     "(returned as content)."),
    ("HTTP requests by status", "timeseries", "reqps", [
        (f"sum by (status) ({rate('itt_http_requests_total')})", "{{status}}")],
     "All HTTP requests by status code; 5xx are server errors (alerted on)."),
]

ITT = [
    ("Thinking depth distribution", "heatmap", "short",
     heatmap_of("itt_thinking_depth_extra_steps"),
     "Per generated token: extra routed steps taken (0 = base steps only)."),
    ("Mean thinking depth", "timeseries", "short", [
        (f"sum({rate('itt_thinking_depth_extra_steps_sum')})"
         f" / sum({rate('itt_thinking_depth_extra_steps_count')})", "mean extra steps / token")],
     "Average extra routed steps per generated token."),
    ("Requested think budgets", "heatmap", "short", heatmap_of("itt_request_think_budget"),
     "The think_budget of each request (0 = cheapest, 1 = every token thinks at every step)."),
    ("Mean requested budget", "timeseries", "short", [
        (f"sum({rate('itt_request_think_budget_sum')})"
         f" / sum({rate('itt_request_think_budget_count')})", "mean budget")],
     "Average think_budget over requests."),
    ("Routed fraction per layer and step", "timeseries", "percentunit", [
        (f"sum by (layer, step) ({rate('itt_routed_tokens_total')})"
         f" / ignoring (layer, step) group_left sum({rate('itt_tokens_computed_total')})",
         "layer {{layer}} step {{step}}")],
     "Fraction of tokens routed at each (ITT layer, routed step); about the mean budget."),
    ("Compute spent vs maximum", "timeseries", "short", [
        (f"sum({rate('itt_block_applications_total')})", "block applications/s"),
        (f"sum({rate('itt_block_applications_max_total')})", "at think budget 1")],
     "Block applications computed, and what they would be if every token took every step."),
    ("Self-speculative decoding: acceptance", "timeseries", "percentunit", [
        (f"sum({rate('itt_spec_decode_num_accepted_tokens_total')})"
         f" / sum({rate('itt_spec_decode_num_draft_tokens_total')})", "acceptance rate"),
        (f"sum by (position) ({rate('itt_spec_decode_num_accepted_tokens_per_pos_total')})"
         f" / ignoring (position) group_left sum({rate('itt_spec_decode_num_drafts_total')})",
         "position {{position}}")],
     "Drafted tokens (at the draft think budget) the request's budget accepted, overall and "
     "by draft position. Tokens per verify step = 1 + accepted / drafts."),
    ("Compute saved by routing", "stat", "percentunit", [
        (f"1 - sum({rate('itt_block_applications_total')})"
         f" / sum({rate('itt_block_applications_max_total')})", "saved")],
     "1 - spent / maximum."),
]


def panel(pid: int, x: int, y: int, title: str, kind: str, unit: str, targets, description):
    p = {
        "id": pid, "type": kind, "title": title, "description": description, "datasource": DS,
        "gridPos": {"h": HEIGHT, "w": WIDTH, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": expr,
                     "legendFormat": legend, "range": True}
                    for i, (expr, legend) in enumerate(targets)],
    }
    if kind == "heatmap":
        for t in p["targets"]:
            t["format"] = "heatmap"
        p["options"] = {"calculate": False, "yAxis": {"unit": unit},
                        "cellGap": 1, "color": {"scheme": "Oranges", "mode": "scheme"}}
    elif kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"}
    return p


def dashboard() -> dict:
    panels, pid, y = [], 1, 0
    for row_title, specs in (("Serving", SERVING), ("Inner thinking (ITT)", ITT)):
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        for i, spec in enumerate(specs):
            panels.append(panel(pid, (i % 2) * WIDTH, y + (i // 2) * HEIGHT, *spec))
            pid += 1
        y += ((len(specs) + 1) // 2) * HEIGHT
    return {
        "uid": "itt-server", "title": "itt-server", "tags": ["itt", "llm", "serving"],
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0},
            {"name": "model_name", "label": "Model", "type": "query", "datasource": DS,
             "query": {"query": "label_values(itt_num_requests_running, model_name)",
                       "refId": "model_name"},
             "definition": "label_values(itt_num_requests_running, model_name)",
             "refresh": 2, "current": {}, "hide": 0, "includeAll": False, "multi": False}]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT}")
