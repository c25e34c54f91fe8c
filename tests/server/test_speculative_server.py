"""``--speculative-config`` through the real server: greedy completions and chat, whole and
streamed, equal the same requests on the standard server (tokens, text, thinking depth); the
spec_decode counters move on /metrics; a bad configuration is a one-line startup error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from live_server import REPO, free_port, launch, metric

SPEC = '{"method": "itt_self", "num_speculative_tokens": 4}'
PROMPTS = ["And God said, Let there be light", "In the beginning", "The LORD is my"]


@pytest.fixture(scope="module")
def spec_server(tiny_model_dir, tmp_path_factory):
    srv = launch(tiny_model_dir, tmp_path_factory.mktemp("spec"), "--speculative-config", SPEC,
                 "--max-num-seqs", "16", "--kv-cache-memory", "64MiB")
    yield srv
    srv.stop()


def completion(server, prompt: str, budget: float, stream: bool) -> tuple[str, list[int]]:
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "think_budget": budget,
            "return_thinking": True, "logprobs": 1, "stream": stream}
    if not stream:
        r = server.http().post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["text"], choice["thinking"]
    text, thinking = "", []
    with server.http().stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["text"]
                    thinking += choice.get("thinking") or []
    return text, thinking


@pytest.mark.parametrize("stream", [False, True])
def test_outputs_equal_the_standard_server(tiny_server, spec_server, stream):
    before = spec_server.metrics()
    for prompt in PROMPTS:
        for budget in (0.5, 1.0):
            assert completion(spec_server, prompt, budget, stream) == \
                completion(tiny_server, prompt, budget, stream)
    chat = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 16,
            "temperature": 0}
    a = spec_server.http().post("/v1/chat/completions", json=chat).json()
    b = tiny_server.http().post("/v1/chat/completions", json=chat).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["usage"]["completion_tokens"] == b["usage"]["completion_tokens"]
    after = spec_server.metrics()
    drafts = (metric(after, "itt_spec_decode_num_drafts_total")
              - metric(before, "itt_spec_decode_num_drafts_total"))
    drafted = (metric(after, "itt_spec_decode_num_draft_tokens_total")
               - metric(before, "itt_spec_decode_num_draft_tokens_total"))
    accepted = (metric(after, "itt_spec_decode_num_accepted_tokens_total")
                - metric(before, "itt_spec_decode_num_accepted_tokens_total"))
    first = (metric(after, "itt_spec_decode_num_accepted_tokens_per_pos_total", position="0")
             - metric(before, "itt_spec_decode_num_accepted_tokens_per_pos_total",
                      position="0"))
    assert drafts > 0 and 0 < accepted <= drafted <= 4 * drafts and first <= drafts


@pytest.mark.parametrize("value, words", [
    ('{"method": "eagle"}', "method must be 'itt_self'"),
    ('{"num_speculative_tokens": 99}', "num_speculative_tokens"),
    ("not json", "not valid JSON"),
])
def test_bad_speculative_config_fails_fast(tiny_model_dir, value, words):
    proc = subprocess.run([sys.executable, "-m", "server", "--port", str(free_port()),
                           "--model", str(tiny_model_dir), "--device", "cpu",
                           "--speculative-config", value],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
