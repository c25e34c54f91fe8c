"""Prefix caching must not change a single response: a seeded random differential test against
two real servers, one with caching (the default) and one with ``--no-enable-prefix-caching``.

The requests are what scoring clients send (lm-eval's ``loglikelihood`` is ``echo`` +
``logprobs`` over a context and several continuations): token-id prompts built in families
that share a prefix of random length — on a block boundary, one token either side of it, or
anywhere — and differ after it, with echo + logprobs (top-k 0 … 5), vLLM's
``prompt_logprobs``, and think budgets 0 … 1. Each family is sent to the cached server twice:
one request at a time (each continuation adopts what the earlier ones cached) and all at once
(they meet in one step, where later ones wait for the shared blocks and adopt them), each of
the two first on a cold prefix for half the families. Every response must be a 200 and equal
the uncached server's: the same tokens, the same top-k sets, the same logprobs within 1e-5
(steps of other shapes round fp32 differently: by ~5e-7 here).

A cached block used to hand an adopter the logprob entry its maker computed for the position
right after the block, keyed by the maker's next token: a 500 (KeyError) when the adopter's
token there was outside the stored top-k, and an extra top-k entry when it was inside.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from live_server import MODEL_NAME, launch

BLOCK_SIZE = 16
NUM_FAMILIES = 24            # bounded for CI: ~100 requests to each server
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def servers(tiny_model_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("differential")
    cached = launch(tiny_model_dir, log_dir, "--max-num-seqs", "8")
    uncached = launch(tiny_model_dir, log_dir, "--max-num-seqs", "8",
                      "--no-enable-prefix-caching")
    yield cached, uncached
    cached.stop()
    uncached.stop()


def complete(server, body: dict) -> dict:
    r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL_NAME, **body},
                   timeout=120)
    assert r.status_code == 200, f"{r.status_code} for {body}: {r.text}"
    return r.json()


def send_together(pool: ThreadPoolExecutor, server, requests: list[dict]) -> list[dict]:
    return list(pool.map(lambda r: complete(server, r), requests))


def shared_length(rng: random.Random) -> int:
    """A prefix length on a block boundary, one token either side of one, or anywhere."""
    boundary = BLOCK_SIZE * rng.randint(1, 3)
    return rng.choice([boundary, boundary, boundary - 1, boundary + 1, rng.randint(2, 60)])


def family(rng: random.Random, vocab: int) -> list[dict]:
    """2 to 4 requests whose prompts share a random prefix, with the same scoring options."""
    prefix = [rng.randrange(3, vocab) for _ in range(shared_length(rng))]
    k = rng.randint(0, 5)
    options: dict = {"max_tokens": rng.randint(1, 2), "temperature": 0,
                     "think_budget": rng.choice([0.0, 0.3, 0.7, 1.0])}
    if rng.random() < 0.75:                              # lm-eval: echo + logprobs
        options |= {"echo": True, "logprobs": k}
        if rng.random() < 0.3:
            options["prompt_logprobs"] = k
    else:                                                # vLLM's prompt_logprobs alone
        options |= {"prompt_logprobs": k, "logprobs": rng.choice([None, k])}
    tails = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 6))]
             for _ in range(rng.randint(2, 4))]
    if rng.random() < 0.3:
        tails.append(list(tails[0]))                     # a repeat
    return [{"prompt": prefix + tail, **options} for tail in tails]


def assert_same_scores(got: dict, want: dict, what: str) -> None:
    """Tokens, top-k sets and logprobs of two completion responses are equal."""
    assert got["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"], what
    assert len(got["choices"]) == len(want["choices"]) == 1, what
    a, b = got["choices"][0], want["choices"][0]
    assert a["text"] == b["text"], what
    if b["logprobs"] is not None:
        la, lb = a["logprobs"], b["logprobs"]
        assert la["tokens"] == lb["tokens"] and la["text_offset"] == lb["text_offset"], what
        for pos, (x, y) in enumerate(zip(la["token_logprobs"], lb["token_logprobs"])):
            assert (x is None) == (y is None), f"{what}, position {pos}"
            if y is not None:
                assert abs(x - y) <= TOLERANCE, f"{what}, position {pos}: {x} vs {y}"
        for pos, (x, y) in enumerate(zip(la["top_logprobs"], lb["top_logprobs"])):
            assert_same_table(x, y, f"{what}, top_logprobs at {pos}")
    plp_a, plp_b = got.get("prompt_logprobs"), want.get("prompt_logprobs")
    assert (plp_a is None) == (plp_b is None), what
    for pos, (x, y) in enumerate(zip(plp_a or [], plp_b or [])):
        if y is not None:
            assert x is not None, f"{what}, prompt_logprobs at {pos}"
            assert {t: e["rank"] for t, e in x.items()} == {t: e["rank"] for t, e in y.items()}
            x = {t: e["logprob"] for t, e in x.items()}
            y = {t: e["logprob"] for t, e in y.items()}
        assert_same_table(x, y, f"{what}, prompt_logprobs at {pos}")


def assert_same_table(x: dict | None, y: dict | None, what: str) -> None:
    assert (x is None) == (y is None), what
    if y is not None:
        assert x is not None and x.keys() == y.keys(), f"{what}: {x} vs {y}"
        assert max(abs(x[t] - y[t]) for t in y) <= TOLERANCE, f"{what}: {x} vs {y}"


def test_the_issue_repro_two_prompts_differing_right_after_a_block(servers, tokenizer):
    """Two prompts sharing exactly one block and differing at position 16, scored as lm-eval
    does: the second used to get a 500."""
    cached, uncached = servers
    first = list(range(10, 10 + BLOCK_SIZE)) + [40]
    second = first[:BLOCK_SIZE] + [41]
    body = {"max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}
    for prompt in (first, second):
        got = complete(cached, {"prompt": prompt, **body})
        assert_same_scores(got, complete(uncached, {"prompt": prompt, **body}), str(prompt))
    assert got["usage"]["prompt_tokens_details"]["cached_tokens"] in (0, BLOCK_SIZE)


def test_random_shared_prefixes_score_the_same_with_caching_on_and_off(servers, tokenizer):
    cached, uncached = servers
    rng = random.Random(24)
    vocab = tokenizer.vocab_size
    families = [family(rng, vocab) for _ in range(NUM_FAMILIES)]
    hits = 0
    with ThreadPoolExecutor(max_workers=4) as pool:
        for f, requests in enumerate(families):
            want = [complete(uncached, r) for r in requests]
            # All at once (they meet in one step) and one at a time, on a cold prefix for
            # one of the two in turn.
            together = send_together(pool, cached, requests) if f % 2 else None
            one_by_one = [complete(cached, r) for r in requests]
            together = together or send_together(pool, cached, requests)
            for i, (w, a, b) in enumerate(zip(want, one_by_one, together)):
                what = f"family {f} request {i} ({requests[i]})"
                assert_same_scores(a, w, what + ", one by one")
                assert_same_scores(b, w, what + ", together")
                hits += a["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert hits >= NUM_FAMILIES, "the requests must hit the cache for this test to mean much"
