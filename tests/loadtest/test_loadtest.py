"""`python -m loadtest` for a few seconds against a real itt-server (tiny model), and the numbers
checked for consistency: with the server's own counters (tokens), with each other (throughput x
duration, percentile order, per-budget sums) and with ITT semantics (budget 0 never thinks,
budget 1 always does). Then the report and plots render."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from live_server import MODEL_NAME, REPO, running_server
from prometheus_client.parser import text_string_to_metric_families

LATENCY_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")


@pytest.fixture(scope="module")
def server_url(tiny_model_dir, tmp_path_factory):
    # Speculation off: the sweep's token counts are checked against computed tokens.
    with running_server(tiny_model_dir, tmp_path_factory.mktemp("loadtest_server"),
                        "--speculative-config", "off") as server:
        yield server.url


def counters(base_url: str) -> dict[str, float]:
    """The server's token and request counters for the test model, from /metrics."""
    text = httpx.get(base_url + "/metrics", timeout=10).text
    wanted = {"itt_generation_tokens_total", "itt_prompt_tokens_total",
              "itt_request_success_total"}
    out = dict.fromkeys(wanted, 0.0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in wanted and s.labels.get("model_name") == MODEL_NAME:
                out[s.name] += s.value
    return out


def loadtest(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "loadtest", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def reconcile(result: dict, before: dict, after: dict) -> None:
    """Everything the load tester counted equals what the server counted meanwhile."""
    runs = result["runs"]
    out_tokens = sum(r["total_output_tokens"] + r["warmup"]["output_tokens"] for r in runs)
    in_tokens = sum(r["total_input_tokens"] + r["warmup"]["input_tokens"] for r in runs)
    requests = sum(r["completed"] + r["warmup"]["requests"] for r in runs)
    delta = {k: after[k] - before[k] for k in after}
    assert out_tokens == delta["itt_generation_tokens_total"]
    assert in_tokens == delta["itt_prompt_tokens_total"]
    assert requests == delta["itt_request_success_total"]


def check_run(run: dict, streaming: bool) -> None:
    assert run["failed"] == 0 and run["errors"] == {}, run["errors"]
    assert run["completed"] > 0
    d = run["duration_s"]
    assert run["output_throughput"] * d == pytest.approx(run["total_output_tokens"])
    assert run["request_throughput"] * d == pytest.approx(run["completed"])
    assert run["total_token_throughput"] * d == pytest.approx(
        run["total_input_tokens"] + run["total_output_tokens"])
    # Client-side token count (per-token thinking lists) equals the server's usage.
    assert run["counted_output_tokens"] == run["total_output_tokens"]
    for key in LATENCY_KEYS:
        s = run[key]
        if s["mean"] is None:
            continue
        assert 0 <= s["p50"] <= s["p90"] <= s["p99"], (key, s)
        assert s["p50"] == s["median"]
    assert run["e2el_ms"]["p99"] <= d * 1000 + 1e-6       # no request outlives the run
    assert run["ttft_ms"]["mean"] <= run["e2el_ms"]["mean"]
    if not streaming:
        assert run["ttft_ms"] == run["e2el_ms"] and run["itl_ms"]["mean"] is None
    budgets = run["per_budget"]
    assert sum(b["completed"] for b in budgets.values()) == run["completed"]
    assert sum(b["output_tokens"] for b in budgets.values()) == run["total_output_tokens"]
    # ITT_SPEC: budget 0 routes nothing, budget 1 routes every token at every step.
    if "0" in budgets:
        assert budgets["0"]["mean_extra_steps"] == 0
    if "1" in budgets:
        assert budgets["1"]["mean_normalized_depth"] == pytest.approx(1.0)


def test_closed_loop_sweep_matches_the_server(server_url, tmp_path):
    before = counters(server_url)
    out = tmp_path / "closed.json"
    proc = loadtest("--base-url", server_url, "--concurrency", "1,4", "--num-requests", "12",
                    "--duration", "8", "--warmup", "1", "--prompt-len", "uniform:4:16",
                    "--output-len", "uniform:2:10", "--think-budgets", "0,0.5,1",
                    "--out", str(out), "--plots", str(tmp_path / "plots"), "--no-progress")
    after = counters(server_url)
    result = json.loads(out.read_text())
    assert result["config"]["model"] == MODEL_NAME
    assert [r["label"] for r in result["runs"]] == ["c=1", "c=4"]
    for run in result["runs"]:
        check_run(run, streaming=True)
    reconcile(result, before, after)
    assert "c=4" in proc.stdout
    for name in ("latency.png", "throughput.png", "budget.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_open_loop_non_streaming_chat(server_url, tmp_path):
    before = counters(server_url)
    out = tmp_path / "open.json"
    loadtest("--base-url", server_url, "--rate", "8", "--num-requests", "10", "--duration", "6",
             "--warmup", "0", "--endpoint", "chat", "--no-stream", "--prompt-len", "8",
             "--output-len", "4", "--think-budgets", "0.5", "--budget-sweep",
             "--out", str(out), "--no-progress")
    after = counters(server_url)
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert run["label"] == "rate=8 b=0.5" and run["rate"] == 8
    check_run(run, streaming=False)
    reconcile(result, before, after)


def test_report_renders(server_url, tmp_path):
    paths = []
    for name, budgets in (("a", "0"), ("b", "1")):
        paths.append(tmp_path / f"{name}.json")
        loadtest("--base-url", server_url, "--concurrency", "2", "--num-requests", "4",
                 "--warmup", "0", "--prompt-len", "6", "--output-len", "3",
                 "--think-budgets", budgets, "--out", str(paths[-1]), "--no-progress")
    side = loadtest("report", *map(str, paths)).stdout
    assert "== c=2 ==" in side and "change" in side and "TTFT median (ms)" in side
    assert "[budget 0]" in side and "[budget 1]" in side
    md = loadtest("report", *map(str, paths), "--summary", "--markdown",
                  "--plots", str(tmp_path / "cmp")).stdout
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 2 and "TTFT p99 (ms)" in table[0]
    assert (tmp_path / "cmp" / "budget.png").exists()


@pytest.mark.parametrize("workload", [("--shared-prefix-len", "40", "--prompt-len", "6"),
                                      ("--multi-turn", "3", "--prompt-len", "12",
                                       "--endpoint", "chat")])
def test_prefix_caching_workloads_report_cached_tokens(server_url, tmp_path, workload):
    before = counters(server_url)
    out = tmp_path / "prefix.json"
    proc = loadtest("--base-url", server_url, "--concurrency", "2", "--num-requests", "6",
                    "--warmup", "1", "--output-len", "4", "--think-budgets", "0.5",
                    *workload, "--out", str(out), "--no-progress")
    after = counters(server_url)
    (run,) = json.loads(out.read_text())["runs"]
    check_run(run, streaming=True)
    reconcile(json.loads(out.read_text()), before, after)
    assert run["completed"] == 6
    assert 0 < run["total_cached_tokens"] < run["total_input_tokens"]
    assert "prompt tokens cached" in proc.stdout
