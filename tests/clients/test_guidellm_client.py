"""guidellm (``guidellm run``, its command line) benchmarks the real server with synthetic
prompts built from the model directory's own tokenizer, at concurrency 1 and then 4, through
chat completions and through completions (streamed, as guidellm sends them). Its JSON report
must show every request successful (none errored, none incomplete), the concurrency asked
for, and exactly the output length asked for (the server honours max_tokens and the
ignore_eos that guidellm sends)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from live_server import MODEL_NAME

pytest.importorskip("guidellm", reason="the clients extra: pip install -e '.[clients]'")

REQUESTS_PER_BENCHMARK = 8
OUTPUT_TOKENS = 8
CONCURRENCY = [1, 4]


@pytest.mark.parametrize("request_format", ["/v1/chat/completions", "/v1/completions"])
def test_benchmark_has_no_errored_requests(client_server, hf_chat_dir, tmp_path,
                                           request_format):
    report = tmp_path / "report.json"
    scenario = {
        "spec": {
            "backend": {"kind": "openai_http", "target": client_server.url,
                        "model": MODEL_NAME, "request_format": request_format},
            "profile": {"kind": "concurrent"},
            "constraints": [{"kind": "max_requests", "count": REQUESTS_PER_BENCHMARK}],
            "tokenizer": {"kind": "huggingface_auto", "model": str(hf_chat_dir)},
            "data": [{"kind": "synthetic_text", "prompt_tokens": 32,
                      "output_tokens": OUTPUT_TOKENS}],
            "outputs": [{"kind": "json", "path": str(report)}],
        },
        "benchmarks": [{"profile.streams": n} for n in CONCURRENCY],
    }
    (tmp_path / "scenario.json").write_text(json.dumps(scenario))
    proc = subprocess.run(
        [sys.executable, "-m", "guidellm", "run", "--scenario", "scenario.json",
         "--disable-console-interactive"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    benchmarks = json.loads(report.read_text())["benchmarks"]
    assert [b["config"]["strategy"]["streams"] for b in benchmarks] == CONCURRENCY
    for b in benchmarks:
        assert b["metrics"]["request_totals"] == {
            "successful": REQUESTS_PER_BENCHMARK, "errored": 0, "incomplete": 0,
            "total": REQUESTS_PER_BENCHMARK}, b["requests"]["errored"][:1]
        assert [r["output_tokens"] for r in b["requests"]["successful"]] \
            == [OUTPUT_TOKENS] * REQUESTS_PER_BENCHMARK
