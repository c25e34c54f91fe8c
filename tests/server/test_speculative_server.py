"""``--speculative-config`` through the real server: greedy completions and chat, whole and
streamed, equal the same requests on a server with speculation off (tokens, text, thinking
depth); the spec_decode counters move on /metrics; the standard server ("auto") speculates
for a lone greedy request but not for a seeded sampled one, whose text stays the one without
speculation; a bad configuration is a one-line startup error."""

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


@pytest.fixture(scope="module")
def auto_server(tiny_model_dir, tmp_path_factory):
    """The server as it starts without the flag (``auto``)."""
    srv = launch(tiny_model_dir, tmp_path_factory.mktemp("auto"), "--max-num-seqs", "16",
                 "--kv-cache-memory", "64MiB")
    yield srv
    srv.stop()


def completion(server, prompt: str, budget: float, stream: bool,
               **sampling) -> tuple[str, list[int]]:
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "think_budget": budget,
            "return_thinking": True, "logprobs": 1, "stream": stream, **sampling}
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
def test_outputs_equal_a_server_without_speculation(tiny_server, spec_server, stream):
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


def test_auto_speculates_for_greedy_and_leaves_seeded_sampling_alone(auto_server,
                                                                    tiny_server):
    """The server without the flag (``auto``: an ITT model in fp32 on CPU) drafts for a lone
    greedy request, with the output of a server without speculation (tiny_server: off); a
    seeded sampled request does not speculate, so its text is the same as there too."""
    def drafts() -> float:
        return metric(auto_server.metrics(), "itt_spec_decode_num_drafts_total")

    before = drafts()
    assert completion(auto_server, PROMPTS[0], 1.0, False) == \
        completion(tiny_server, PROMPTS[0], 1.0, False)
    greedy = drafts()
    assert greedy > before
    seeded = {"temperature": 0.9, "seed": 7}
    assert completion(auto_server, PROMPTS[1], 1.0, False, **seeded) == \
        completion(tiny_server, PROMPTS[1], 1.0, False, **seeded)
    assert drafts() == greedy


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
