"""The load tester's parts without a server: workload parsing, the vLLM metric definitions on
hand-made results, SSE parsing against a mock transport, and the report/plot renderers."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import numpy as np
import pytest

from loadtest.client import OpenAIClient, RequestResult
from loadtest.metrics import summarize
from loadtest.report import render_summary, render_table
from loadtest.workload import BudgetMix, LengthDist, RequestSpec, request_stream


def test_length_specs():
    rng = random.Random(0)
    assert LengthDist.parse("7").sample(rng) == 7
    u = LengthDist.parse("uniform:3:5")
    assert {u.sample(rng) for _ in range(200)} == {3, 4, 5}
    assert min(LengthDist.parse("normal:2:10").sample(rng) for _ in range(200)) == 1
    for bad in ("x", "uniform:5:3", "normal:1", "exp:1:2"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


def test_budget_mix():
    mix = BudgetMix.parse("0:1,1:3,default")
    assert mix.budgets == (0.0, 1.0, None) and mix.weights == (1.0, 3.0, 1.0)
    rng = random.Random(0)
    draws = [mix.sample(rng) for _ in range(5000)]
    assert draws.count(1.0) / len(draws) == pytest.approx(0.6, abs=0.03)
    assert [m.budgets for m in mix.single()] == [(0.0,), (1.0,), (None,)]
    with pytest.raises(ValueError):
        BudgetMix.parse("1.5")


def test_request_stream_is_deterministic():
    args = (LengthDist.parse("uniform:2:9"), LengthDist.parse("4"), BudgetMix.parse("0,1"))
    a = list(request_stream(*args, seed=3, limit=5))
    b = list(request_stream(*args, seed=3, limit=5))
    assert a == b and len(a) == 5 and all(2 <= len(s.prompt.split()) <= 9 for s in a)


def result(i, budget, ttft, latency, tokens, itl=(), depth=None, ok=True, status="200"):
    return RequestResult(i, budget, success=ok, status=status, ttft=ttft, latency=latency,
                         itl=list(itl), prompt_tokens=10, output_tokens=tokens,
                         counted_tokens=tokens, mean_extra_steps=depth,
                         mean_normalized_depth=None if depth is None else depth / 4)


def test_metrics_follow_vllm_definitions():
    rs = [result(0, 0.0, 0.1, 0.5, 5, itl=[0.1] * 4, depth=0.0),
          result(1, 1.0, 0.2, 0.2, 1, depth=4.0),                  # 1 token: no TPOT
          result(2, 1.0, 0.3, 1.3, 3, itl=[0.5, 0.5], depth=4.0),
          result(3, 1.0, 0, 0, 0, ok=False, status="503")]
    s = summarize(rs, duration_s=2.0)
    assert (s["completed"], s["failed"], s["errors"]) == (3, 1, {"503": 1})
    assert s["total_output_tokens"] == 9 and s["output_throughput"] == 4.5
    assert s["request_throughput"] == 1.5 and s["total_token_throughput"] == (30 + 9) / 2
    assert s["ttft_ms"]["mean"] == pytest.approx(200)
    # TPOT = (e2e - ttft) / (tokens - 1), only for requests with more than one token
    assert s["tpot_ms"]["mean"] == pytest.approx(np.mean([100, 500]))
    itl = [100] * 4 + [500] * 2                                   # all gaps of all requests
    assert s["itl_ms"]["p90"] == pytest.approx(np.percentile(itl, 90))
    assert s["e2el_ms"]["median"] == pytest.approx(500)
    # depth is token-weighted: (0*5 + 4*1 + 4*3) / 9
    assert s["mean_extra_steps"] == pytest.approx(16 / 9)
    assert s["per_budget"]["1"]["completed"] == 2 and s["per_budget"]["1"]["requests"] == 3
    assert s["per_budget"]["1"]["mean_normalized_depth"] == pytest.approx(1.0)
    assert s["per_budget"]["0"]["output_tokens"] == 5


def sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n"
                    for e in events)


SPEC = RequestSpec(0, "hi there", 3, 0.5)


def send(handler, spec=SPEC, **kw):
    async def go():
        client = OpenAIClient("http://test", "m", transport=httpx.MockTransport(handler), **kw)
        try:
            return await client.send(spec)
        finally:
            await client.aclose()
    return asyncio.run(go())


def test_streaming_chat_is_timed_from_output_chunks():
    seen = {}

    def handler(request):
        seen.update(json.loads(request.content))
        body = sse({"choices": [{"delta": {"role": "assistant"}}]},             # no output
                   {"choices": [{"delta": {"content": "a"}, "thinking": [2]}]},
                   {"choices": [{"delta": {"content": "bc"}, "thinking": [0, 4]}]},
                   {"choices": [{"delta": {}, "finish_reason": "length"}]},    # no output
                   {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3,
                                             "thinking": {"mean_extra_steps": 2.0,
                                                          "mean_normalized_depth": 0.5}}},
                   b"[DONE]")
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    r = send(handler, endpoint="chat")
    assert seen["think_budget"] == 0.5 and seen["stream_options"] == {"include_usage": True}
    assert seen["messages"][0]["content"] == "hi there" and seen["return_thinking"] is True
    assert r.success and r.status == "200"
    assert (r.output_tokens, r.counted_tokens, r.prompt_tokens) == (3, 3, 2)
    assert r.extra_steps == [2, 0, 4] and r.mean_normalized_depth == 0.5
    assert len(r.itl) == 1 and 0 < r.ttft <= r.latency


def test_non_streaming_completion():
    def handler(request):
        return httpx.Response(200, json={
            "choices": [{"text": "xyz", "thinking": [1, 1, 1]}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 3}})

    r = send(handler, stream=False)
    assert r.success and r.ttft == r.latency and r.itl == [] and r.counted_tokens == 3


def test_failures_carry_their_status():
    r = send(lambda request: httpx.Response(400, json={"error": {"message": "bad budget"}}))
    assert not r.success and r.status == "400" and "bad budget" in r.error

    def refuse(request):
        raise httpx.ConnectError("refused")
    r = send(refuse)
    assert not r.success and r.status == "ConnectError"
    r = send(lambda request: httpx.Response(200, content=sse(b"[DONE]")))
    assert not r.success and r.status == "no output"


def fake_result(labels=("c=1", "c=4")) -> dict:
    rs = [result(0, 0.0, 0.1, 0.5, 5, itl=[0.1] * 4, depth=0.0),
          result(1, 1.0, 0.3, 1.3, 3, itl=[0.5, 0.5], depth=4.0)]
    runs = [{"label": lab, "concurrency": int(lab[2:]), "rate": None,
             "think_budgets": {"0": 1.0, "1": 1.0}, **summarize(rs, 1.0 + i)}
            for i, lab in enumerate(labels)]
    return {"version": 1, "config": {"budget_sweep": False}, "runs": runs}


def test_report_and_plots(tmp_path):
    results = {"a": fake_result(), "b": fake_result(("c=4",))}
    side = render_table(results)
    assert "== c=1 ==" in side and "change" in side
    assert "+100.0%" in side     # c=4: b ran in half the time, so twice the req/s
    md = render_summary(results, markdown=True).splitlines()
    assert md[0].startswith("| run | point") and len(md) == 2 + 3
    from loadtest.plots import render
    paths = render(results, tmp_path)
    assert [p.name for p in paths] == ["latency.png", "throughput.png", "budget.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_goodput_counts_requests_within_both_slos_and_applied_budget_is_token_weighted():
    from loadtest.client import RequestResult
    from loadtest.metrics import summarize

    def result(ttft, latency, tokens, applied):
        r = RequestResult(0, 1.0, success=True, ttft=ttft, latency=latency,
                          output_tokens=tokens)
        r.applied_think_budget = applied
        return r
    rs = [result(0.1, 1.1, 11, 1.0),       # TTFT 100 ms, 100 ms per token: good
          result(0.5, 1.5, 11, 0.5),       # TTFT over 200 ms
          result(0.1, 3.1, 11, 0.0),       # 300 ms per token: over 150 ms
          result(0.1, 0.6, 31, 0.25)]      # good
    s = summarize(rs, 2.0, slo_ttft_ms=200, slo_itl_ms=150)
    assert s["goodput"] == 2 / 2.0
    assert s["mean_applied_think_budget"] == (11 * 1.0 + 11 * 0.5 + 31 * 0.25) / 64
    assert summarize(rs, 2.0)["goodput"] is None
