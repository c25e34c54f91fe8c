"""Prometheus metrics, exactly the contract in docs/metrics.md (the vLLM set under ``itt_``
plus ITT's own), plus ``itt_http_requests_total`` for the error-rate alert.

Engine counters are cumulative snapshots (``EngineStats``), so they are exported by a custom
collector at scrape time; per-request metrics are observed by a ``RequestTracker`` that
follows each request's delta outputs on the event loop.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from itt_runtime.engine.async_engine import AsyncLLMEngine
from itt_runtime.engine.config import STEP_TOKEN_BUCKETS
from itt_runtime.outputs import RequestMetrics, RequestOutput

# vLLM's bucket boundaries.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0]
LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
BUDGET_BUCKETS = [round(0.1 * i, 1) for i in range(11)]
N_BUCKETS = [1.0, 2.0, 5.0, 10.0, 20.0]
HTTP_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
FINISH_REASONS = ("stop", "length", "abort")
COMPILE_STATES = ("compiling", "ready", "failed")


def buckets_1_2_5(max_value: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, … up to ``max_value`` (vLLM's token-count buckets)."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return out
            out.append(float(m * scale))
        scale *= 10


class Metrics:
    """All metrics of one server, in their own registry (``render`` is the /metrics body)."""

    def __init__(self, model_name: str, engine: AsyncLLMEngine) -> None:
        self.model_name = model_name
        self.registry = reg = CollectorRegistry()
        name, lbl = [model_name], ["model_name"]
        max_len = engine.info.max_model_len
        max_extra = engine.model_config.max_extra_steps

        def counter(metric: str, doc: str) -> Counter:
            return Counter(metric, doc, lbl, registry=reg).labels(*name)

        def histogram(metric: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(metric, doc, lbl, buckets=buckets, registry=reg).labels(*name)

        self.http_requests = Counter("itt_http_requests", "HTTP requests by route and status",
                                     ["model_name", "method", "path", "status"], registry=reg)
        self.http_duration = Histogram(
            "itt_http_request_duration_seconds", "HTTP request duration by route and status",
            ["model_name", "method", "path", "status"], buckets=HTTP_BUCKETS, registry=reg)
        self.prompt_tokens = counter("itt_prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = counter("itt_generation_tokens", "Tokens generated")
        self.request_success = Counter("itt_request_success", "Finished requests (per choice)",
                                       ["model_name", "finished_reason"], registry=reg)
        for reason in FINISH_REASONS:
            self.request_success.labels(model_name, reason)
        self.ttft = histogram("itt_time_to_first_token_seconds", "Arrival to first token",
                              TTFT_BUCKETS)
        self.itl = histogram("itt_inter_token_latency_seconds",
                             "Time between consecutive output tokens", ITL_BUCKETS)
        self.tpot = histogram("itt_time_per_output_token_seconds",
                              "Per request: (e2e - ttft) / (tokens - 1)", ITL_BUCKETS)
        self.e2e = histogram("itt_e2e_request_latency_seconds", "Arrival to finish",
                             LATENCY_BUCKETS)
        self.queue_time = histogram("itt_request_queue_time_seconds",
                                    "Arrival to first scheduled", LATENCY_BUCKETS)
        self.prompt_len = histogram("itt_request_prompt_tokens", "Prompt length",
                                    buckets_1_2_5(max_len))
        self.generation_len = histogram("itt_request_generation_tokens", "Output length",
                                        buckets_1_2_5(max_len))
        self.thinking_depth = histogram(
            "itt_thinking_depth_extra_steps", "Extra routed steps per generated token",
            [float(i) for i in range(max_extra + 1)])
        self.think_budget = histogram("itt_request_think_budget", "Think budget per request",
                                      BUDGET_BUCKETS)
        self.prefill_time = histogram("itt_request_prefill_time_seconds",
                                      "First scheduled to first token", LATENCY_BUCKETS)
        self.decode_time = histogram("itt_request_decode_time_seconds",
                                     "First token to finish", LATENCY_BUCKETS)
        self.inference_time = histogram("itt_request_inference_time_seconds",
                                        "First scheduled to finish", LATENCY_BUCKETS)
        self.params_n = histogram("itt_request_params_n", "Requested n per request",
                                  N_BUCKETS)
        self.params_max_tokens = histogram("itt_request_params_max_tokens",
                                           "Requested max_tokens per request",
                                           buckets_1_2_5(max_len))
        # The standard process, platform and GC metrics of the default registry.
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=reg)
        self.applied_budget = histogram(
            "itt_request_applied_think_budget",
            "Per request: token-weighted mean of the think budgets its tokens were computed at "
            "(below the requested one when elastic thinking stepped in)", BUDGET_BUCKETS)
        self.tool_requests = Counter(
            "itt_tool_call_requests", "Chat requests with tools, by tool_choice (none, auto, "
            "required, named)", ["model_name", "tool_choice"], registry=reg)
        for choice in ("none", "auto", "required", "named"):
            self.tool_requests.labels(model_name, choice)
        self.tool_parse_failures = Counter(
            "itt_tool_call_parse_failures", "Tool-call blocks the 'auto' parser could not "
            "read (returned as content), by parser", ["model_name", "parser"], registry=reg)
        reg.register(EngineCollector(engine, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def count_http(self, method: str, path: str, status: int, seconds: float) -> None:
        self.http_requests.labels(self.model_name, method, path, str(status)).inc()
        self.http_duration.labels(self.model_name, method, path, str(status)).observe(seconds)

    def count_tool_request(self, tool_choice: str) -> None:
        self.tool_requests.labels(self.model_name, tool_choice).inc()

    def count_tool_parse_failures(self, parser: str, failures: int) -> None:
        self.tool_parse_failures.labels(self.model_name, parser).inc(failures)

    def track(self, num_prompt_tokens: int, n: int, think_budget: float,
              max_tokens: int) -> RequestTracker:
        self.think_budget.observe(think_budget)
        self.params_n.observe(n)
        self.params_max_tokens.observe(max_tokens)
        return RequestTracker(self, num_prompt_tokens, n)


class RequestTracker:
    """Observes one engine request from its delta outputs. ``close`` must run when the
    request ends, however it ends: choices that never finished count as aborted."""

    def __init__(self, metrics: Metrics, num_prompt_tokens: int, n: int) -> None:
        self.m = metrics
        self.num_prompt_tokens = num_prompt_tokens
        self.n = n
        self.arrival = time.time()
        self.times: RequestMetrics | None = None
        self.last_token_at: dict[int, float] = {}
        self.generated = [0] * n
        self.applied_budget_sum = 0.0
        self.finished: set[int] = set()
        self.closed = False

    def on_output(self, out: RequestOutput) -> None:
        now = time.time()
        if self.times is None:              # first output: the prompt has been processed
            self.m.prompt_tokens.inc(self.num_prompt_tokens)
        self.times = out.metrics
        for c in out.outputs:
            k = len(c.token_ids)
            if k:
                self.m.generation_tokens.inc(k)
                for extra in c.thinking:
                    self.m.thinking_depth.observe(extra)
                self.applied_budget_sum += sum(c.applied_think_budgets)
                prev = self.last_token_at.get(c.index)
                if prev is not None:
                    for _ in range(k):
                        self.m.itl.observe((now - prev) / k)
                self.last_token_at[c.index] = now
                self.generated[c.index] += k
            if c.finish_reason is not None:
                self._finish_choice(c.index, c.finish_reason)
        if out.finished:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for i in range(self.n):
            self._finish_choice(i, "abort")
        t = self.times
        arrival = t.arrival_time if t else self.arrival
        finished = (t.finished_time if t and t.finished_time else None) or time.time()
        e2e = finished - arrival
        self.m.e2e.observe(e2e)
        self.m.prompt_len.observe(self.num_prompt_tokens)
        if sum(self.generated):
            self.m.applied_budget.observe(self.applied_budget_sum / sum(self.generated))
        if t and t.first_scheduled_time:
            self.m.queue_time.observe(t.first_scheduled_time - arrival)
            self.m.inference_time.observe(finished - t.first_scheduled_time)
            if t.first_token_time:
                self.m.prefill_time.observe(t.first_token_time - t.first_scheduled_time)
                self.m.decode_time.observe(finished - t.first_token_time)
        if t and t.first_token_time:
            ttft = t.first_token_time - arrival
            self.m.ttft.observe(ttft)
            if self.generated[0] > 1:
                self.m.tpot.observe((e2e - ttft) / (self.generated[0] - 1))

    def _finish_choice(self, index: int, reason: str) -> None:
        if index in self.finished:
            return
        self.finished.add(index)
        self.m.request_success.labels(self.m.model_name, reason).inc()
        self.m.generation_len.observe(self.generated[index])


class EngineCollector:
    """Gauges and cumulative counters read from the engine's latest stats at scrape time."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self):
        s, mc, name = self.engine.stats(), self.engine.model_config, [self.model_name]

        def family(cls, metric: str, doc: str, value: float):
            fam = cls(metric, doc, labels=["model_name"])
            fam.add_metric(name, value)
            return fam

        yield family(GaugeMetricFamily, "itt_num_requests_running",
                     "Requests in the running batch", s.num_running)
        yield family(GaugeMetricFamily, "itt_num_requests_waiting",
                     "Requests waiting to be scheduled", s.num_waiting)
        yield family(GaugeMetricFamily, "itt_kv_cache_usage_perc",
                     "Fraction of KV blocks in use", s.kv_usage)
        yield family(GaugeMetricFamily, "itt_num_kv_blocks", "KV blocks in the pool",
                     s.num_blocks)
        yield family(CounterMetricFamily, "itt_num_preemptions", "Preemptions (recompute)",
                     s.num_preemptions)
        yield family(CounterMetricFamily, "itt_tokens_computed",
                     "Tokens that went through the model", s.tokens_computed)
        yield family(CounterMetricFamily, "itt_prefix_cache_queries",
                     "Prompt tokens looked up in the prefix cache", s.prefix_cache_queries)
        yield family(CounterMetricFamily, "itt_prefix_cache_hits",
                     "Prompt tokens found in the prefix cache", s.prefix_cache_hits)
        yield family(GaugeMetricFamily, "itt_elastic_think_scale",
                     "Elastic thinking: requests with a range run at min + scale * (requested "
                     "- min); 1 = full budget", s.elastic_scale)
        yield family(CounterMetricFamily, "itt_elastic_reduced_steps",
                     "Engine steps run with elastic requests below their requested budget",
                     s.elastic_reduced_steps)
        info = self.engine.info
        config = GaugeMetricFamily("itt_cache_config_info", "KV cache configuration",
                                   labels=["model_name", "block_size", "num_gpu_blocks",
                                           "enable_prefix_caching", "num_kv_streams"])
        config.add_metric(name + [str(info.block_size), str(info.num_kv_blocks),
                                  str(info.enable_prefix_caching), str(mc.num_kv_streams)], 1)
        yield config
        steps = HistogramMetricFamily("itt_iteration_tokens", "Tokens per engine step",
                                      labels=["model_name"])
        cumulative, buckets = 0, []
        for bound, count in zip([*map(float, STEP_TOKEN_BUCKETS), float("inf")],
                                s.step_token_counts or [0] * (len(STEP_TOKEN_BUCKETS) + 1)):
            cumulative += count
            buckets.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
        steps.add_metric(name, buckets, sum_value=s.step_token_sum)
        yield steps
        yield family(CounterMetricFamily, "itt_block_applications",
                     "Block applications computed (base + routed steps)", s.block_applications)
        yield family(CounterMetricFamily, "itt_block_applications_max",
                     "Block applications at think budget 1",
                     s.tokens_computed * (mc.n_layers + mc.max_extra_steps))
        yield family(CounterMetricFamily, "itt_spec_decode_num_drafts",
                     "Self-speculative decoding: verify steps (one per sequence and step)",
                     s.spec_num_drafts)
        yield family(CounterMetricFamily, "itt_spec_decode_num_draft_tokens",
                     "Self-speculative decoding: tokens drafted", s.spec_num_draft_tokens)
        yield family(CounterMetricFamily, "itt_spec_decode_num_accepted_tokens",
                     "Self-speculative decoding: drafted tokens accepted",
                     s.spec_num_accepted_tokens)
        per_pos = CounterMetricFamily("itt_spec_decode_num_accepted_tokens_per_pos",
                                      "Self-speculative decoding: accepted tokens by draft "
                                      "position (0 = the first drafted)",
                                      labels=["model_name", "position"])
        for position, count in enumerate(s.spec_accepted_per_position):
            per_pos.add_metric(name + [str(position)], count)
        yield per_pos
        state = GaugeMetricFamily("itt_compiled_step_state", "Compiled CPU decode steps: 1 for "
                                  "each variant's current state (compiling, ready, failed)",
                                  labels=["model_name", "variant", "state"])
        ready = GaugeMetricFamily("itt_compiled_step_ready_seconds", "Compiled CPU decode "
                                  "steps: seconds after start-up each variant became ready",
                                  labels=["model_name", "variant"])
        for variant, (now, seconds) in s.compiled_steps.items():
            for st in COMPILE_STATES:
                state.add_metric(name + [variant, st], float(st == now))
            if seconds is not None:
                ready.add_metric(name + [variant], seconds)
        yield state
        yield ready
        routed = CounterMetricFamily("itt_routed_tokens", "Tokens routed per (layer, step)",
                                     labels=["model_name", "layer", "step"])
        for k, count in enumerate(s.routed_tokens):
            layer = mc.itt_layers[k // mc.n_routed_steps]
            routed.add_metric(name + [str(layer), str(k % mc.n_routed_steps + 1)], count)
        yield routed
