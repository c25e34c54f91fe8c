"""/metrics (parsed with prometheus_client's parser): every metric of docs/metrics.md moves
as it should after a few requests; a client that disconnects mid-stream shows up as an abort
with the KV cache back to empty; a KV cache too small for the load preempts, and preempted
requests still produce their solo output."""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from live_server import MODEL_NAME, launch, metric

from server.metrics import ITL_BUCKETS, LATENCY_BUCKETS, TTFT_BUCKETS

N_LAYERS, MAX_EXTRA, KV_BLOCKS = 4, 4, 200
PROMPT = "And God called the light Day"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """A KV cache of 200 blocks (4 KiB each): room for one long request, not three."""
    srv = launch(tiny_model_dir, tmp_path_factory.mktemp("metrics"), "--kv-cache-memory",
                 f"{(KV_BLOCKS + 1) * 4}KiB", "--max-num-seqs", "8",   # + scratch
                 "--speculative-config", "off")       # one token per step (conftest.py)
    yield srv
    srv.stop()


def delta(after: dict, before: dict, name: str, **labels) -> float:
    return metric(after, name, **labels) - metric(before, name, **labels)


def complete(server, **body) -> dict:
    body = {"model": MODEL_NAME, "prompt": PROMPT, "temperature": 0, **body}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_compute_counters_follow_the_budget(server):
    for budget, per_token in ((1.0, N_LAYERS + MAX_EXTRA), (0.0, N_LAYERS)):
        before = server.metrics()
        complete(server, max_tokens=5, think_budget=budget)
        after = server.metrics()
        tokens = delta(after, before, "itt_tokens_computed_total")
        assert tokens >= 5
        assert delta(after, before, "itt_block_applications_total") == tokens * per_token
        assert delta(after, before, "itt_block_applications_max_total") == \
            tokens * (N_LAYERS + MAX_EXTRA)
        routed = sum(delta(after, before, "itt_routed_tokens_total", layer=str(layer),
                           step=str(step)) for layer in (1, 3) for step in (1, 2))
        assert routed == tokens * (per_token - N_LAYERS)


def test_request_metrics_move(server):
    before = server.metrics()
    results = [complete(server, max_tokens=6, ignore_eos=True, think_budget=0.3),
               complete(server, max_tokens=4, ignore_eos=True, n=2, temperature=0.7, seed=1),
               complete(server, max_tokens=8, stop_token_ids=list(range(512)))]  # stops at once
    chunks = list(server.client().completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=7, stream=True,
        extra_body={"ignore_eos": True, "think_budget": 1.0}))
    assert len(chunks) == 7
    httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 0})
    after = server.metrics()

    prompt_tokens = sum(r["usage"]["prompt_tokens"] for r in results) + results[0]["usage"][
        "prompt_tokens"]                                  # the streamed one has the same prompt
    generated = sum(r["usage"]["completion_tokens"] for r in results) + 7
    assert delta(after, before, "itt_prompt_tokens_total") == prompt_tokens
    assert delta(after, before, "itt_generation_tokens_total") == generated
    assert delta(after, before, "itt_request_success_total", finished_reason="length") == 4
    assert delta(after, before, "itt_request_success_total", finished_reason="stop") == 1
    assert delta(after, before, "itt_request_success_total", finished_reason="abort") == 0
    for name in ("itt_time_to_first_token_seconds", "itt_e2e_request_latency_seconds",
                 "itt_request_queue_time_seconds", "itt_request_prompt_tokens",
                 "itt_request_think_budget"):
        assert delta(after, before, f"{name}_count") == 4, name
    assert delta(after, before, "itt_request_think_budget_sum") == pytest.approx(
        0.3 + 0.5 + 0.5 + 1.0)
    assert delta(after, before, "itt_request_generation_tokens_count") == 5   # per choice
    assert delta(after, before, "itt_request_generation_tokens_sum") == generated
    assert delta(after, before, "itt_time_per_output_token_seconds_count") == 3
    assert delta(after, before, "itt_inter_token_latency_seconds_count") == generated - 5
    assert delta(after, before, "itt_thinking_depth_extra_steps_count") == generated
    assert delta(after, before, "itt_thinking_depth_extra_steps_sum") >= 7 * MAX_EXTRA
    assert delta(after, before, "itt_http_requests_total", method="POST",
                 path="/v1/completions", status="200") == 4
    assert delta(after, before, "itt_http_requests_total", method="POST",
                 path="/v1/completions", status="400") == 1
    assert metric(after, "itt_num_kv_blocks") == KV_BLOCKS
    for gauge in ("itt_num_requests_running", "itt_num_requests_waiting",
                  "itt_kv_cache_usage_perc"):
        assert metric(after, gauge) == 0


def test_vllm_parity_metrics_move(server):
    """Prefill/decode/inference time, request parameters, tokens per step, the cache-config
    info, HTTP durations and the process metrics; and promtool finds the exposition clean."""
    before = server.metrics()
    complete(server, max_tokens=5, ignore_eos=True)
    complete(server, max_tokens=3, ignore_eos=True, n=2, temperature=0.7, seed=2)
    after = server.metrics()
    for name in ("itt_request_prefill_time_seconds", "itt_request_decode_time_seconds",
                 "itt_request_inference_time_seconds", "itt_request_params_n",
                 "itt_request_params_max_tokens"):
        assert delta(after, before, f"{name}_count") == 2, name
    assert delta(after, before, "itt_request_params_n_sum") == 3
    assert delta(after, before, "itt_request_params_max_tokens_sum") == 8
    # Every token computed went through some step: the step histogram sums to the counter.
    assert delta(after, before, "itt_iteration_tokens_sum") == delta(
        after, before, "itt_tokens_computed_total") > 0
    assert delta(after, before, "itt_iteration_tokens_count") >= 5
    assert delta(after, before, "itt_http_request_duration_seconds_count", method="POST",
                 path="/v1/completions", status="200") == 2
    info = [labels for (name, labels) in after if name == "itt_cache_config_info"]
    assert dict(info[0])["num_gpu_blocks"] == str(KV_BLOCKS)
    assert metric(after, "process_resident_memory_bytes") > 0
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    check = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                           capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_bucket_boundaries(server):
    samples = server.metrics()

    def bounds(name: str) -> list[float]:
        return sorted(float(dict(labels)["le"]) for (n, labels) in samples
                      if n == f"{name}_bucket")[:-1]              # drop +Inf

    assert bounds("itt_time_to_first_token_seconds") == TTFT_BUCKETS
    assert bounds("itt_inter_token_latency_seconds") == ITL_BUCKETS
    assert bounds("itt_time_per_output_token_seconds") == ITL_BUCKETS
    assert bounds("itt_e2e_request_latency_seconds") == LATENCY_BUCKETS
    assert bounds("itt_request_queue_time_seconds") == LATENCY_BUCKETS
    assert bounds("itt_request_prompt_tokens") == [1, 2, 5, 10, 20, 50, 100, 200, 500]
    assert bounds("itt_request_generation_tokens") == [1, 2, 5, 10, 20, 50, 100, 200, 500]
    assert bounds("itt_thinking_depth_extra_steps") == [0, 1, 2, 3, 4]
    assert bounds("itt_request_think_budget") == pytest.approx([i / 10 for i in range(11)])


def wait_for(server, check, timeout: float = 10.0) -> dict:
    deadline = time.time() + timeout
    while True:
        samples = server.metrics()
        if check(samples):
            return samples
        assert time.time() < deadline, "metrics did not settle"
        time.sleep(0.05)


def test_disconnect_mid_stream_aborts_and_frees_kv(server):
    before = server.metrics()
    stream = server.client().completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=300, stream=True,
        extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks), next(chunks)
    busy = server.metrics()
    assert metric(busy, "itt_kv_cache_usage_perc") > 0
    assert metric(busy, "itt_num_requests_running") == 1
    stream.close()
    after = wait_for(server, lambda s: delta(s, before, "itt_request_success_total",
                                             finished_reason="abort") == 1)
    after = wait_for(server, lambda s: metric(s, "itt_kv_cache_usage_perc") == 0
                     and metric(s, "itt_num_requests_running") == 0)
    assert delta(after, before, "itt_generation_tokens_total") < 300


def test_disconnect_while_waiting_for_a_whole_response_aborts(server):
    before = server.metrics()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", timeout=0.3, json={
            "prompt": PROMPT, "max_tokens": 300, "ignore_eos": True})
    wait_for(server, lambda s: delta(s, before, "itt_request_success_total",
                                     finished_reason="abort") == 1
             and metric(s, "itt_kv_cache_usage_perc") == 0)


def test_preemption_under_kv_pressure_keeps_outputs(server):
    prompts = ["In the beginning", "And the evening", "And God made"]

    def run(prompt: str) -> str:
        return complete(server, prompt=prompt, max_tokens=280, ignore_eos=True,
                        think_budget=1.0)["choices"][0]["text"]

    alone = [run(p) for p in prompts]
    before = server.metrics()
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(run, prompts))
    after = server.metrics()
    assert delta(after, before, "itt_num_preemptions_total") > 0
    assert together == alone
