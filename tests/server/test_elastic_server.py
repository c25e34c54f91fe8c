"""Elastic thinking through the HTTP API: a request with a range is lowered when the latency
target is missed and reports what it got (usage.thinking.applied_think_budget, per-token
thinking), a fixed request is untouched, the controller's state is on /metrics, and bad
ranges and flags are refused with the field or flag named."""

from __future__ import annotations

import threading

import httpx
import pytest
from live_server import MODEL_NAME, launch, metric

from server.cli import main

BODY = {"model": MODEL_NAME, "prompt": "In the beginning", "max_tokens": 48,
        "temperature": 0, "ignore_eos": True}


def test_elastic_requests_think_less_under_a_missed_target(tiny_model_dir, tmp_path):
    # 0.05 ms per token cannot be met: the controller drops the scale to 0 and stays there.
    server = launch(tiny_model_dir, tmp_path, "--elastic-thinking", "--target-itl-ms", "0.05")
    try:
        results: dict = {}

        def one(name, extra):
            results[name] = httpx.post(f"{server.url}/v1/completions", timeout=120,
                                       json={**BODY, **extra}).json()
        threads = [threading.Thread(target=one, args=(f"elastic{i}", {
            "think_budget": 1.0, "min_think_budget": 0.25, "return_thinking": True}))
            for i in range(4)]
        threads.append(threading.Thread(target=one, args=("fixed", {"think_budget": 1.0})))
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for i in range(4):
            usage = results[f"elastic{i}"]["usage"]["thinking"]
            assert usage["think_budget"] == 1.0
            assert 0.25 <= usage["applied_think_budget"] < 1.0
        fixed = results["fixed"]["usage"]["thinking"]
        assert fixed["applied_think_budget"] == fixed["think_budget"] == 1.0
        samples = server.metrics()
        assert metric(samples, "itt_elastic_think_scale") < 1.0
        assert metric(samples, "itt_elastic_reduced_steps_total") > 0
        assert metric(samples, "itt_request_applied_think_budget_count") == 5
    finally:
        server.stop()


def test_bad_range_is_400_naming_the_field(tiny_server):
    # The last: only the floor, above the server's default budget (the tiny model's 0.5).
    for extra in ({"think_budget": 0.2, "min_think_budget": 0.5}, {"min_think_budget": 2},
                  {"min_think_budget": "low"}, {"min_think_budget": 0.99}):
        resp = httpx.post(f"{tiny_server.url}/v1/completions", json={**BODY, **extra},
                          timeout=30)
        assert resp.status_code == 400, (extra, resp.text)
        assert resp.json()["error"]["param"] == "min_think_budget"


@pytest.mark.parametrize("flags", [["--target-itl-ms", "50"], ["--elastic-thinking"],
                                   ["--elastic-thinking", "--target-ttft-ms", "-3"]])
def test_bad_elastic_flags_fail_with_one_line(flags, capsys):
    try:
        code = main(flags)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("itt-server: error:")
