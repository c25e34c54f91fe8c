"""Prefix caching as a client sees it, against real servers (one with caching on, the default,
and one with ``--no-enable-prefix-caching``): ``usage.prompt_tokens_details.cached_tokens``
in every response shape, the /metrics counters moving by exactly those tokens, a request at
another think budget not hitting, and the greedy outputs of both servers equal."""

from __future__ import annotations

import httpx
import pytest
from live_server import MODEL_NAME, launch, metric

BLOCK_SIZE = 16
STORY = ("And God said, Let there be light: and there was light. And God saw the light, that it "
         "was good: and God divided the light from the darkness. And God called the light Day, "
         "and the darkness he called Night. And the evening and the morning were the first day.")


@pytest.fixture(scope="module")
def cached(tiny_model_dir, tmp_path_factory):
    srv = launch(tiny_model_dir, tmp_path_factory.mktemp("prefix_on"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def uncached(tiny_model_dir, tmp_path_factory):
    srv = launch(tiny_model_dir, tmp_path_factory.mktemp("prefix_off"),
                 "--no-enable-prefix-caching")
    yield srv
    srv.stop()


def post(server, path: str, **body) -> dict:
    body = {"model": MODEL_NAME, "temperature": 0, "max_tokens": 4, **body}
    r = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def complete(server, prompt, **body) -> dict:
    return post(server, "/v1/completions", prompt=prompt, **body)


def cached_tokens(body: dict) -> int:
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


def counters(server) -> tuple[float, float]:
    samples = server.metrics()
    return (metric(samples, "itt_prefix_cache_queries_total"),
            metric(samples, "itt_prefix_cache_hits_total"))


def test_the_same_prompt_twice_hits_and_metrics_count_it(cached):
    prompt = "One: " + STORY
    q0, h0 = counters(cached)
    first = complete(cached, prompt)
    q1, h1 = counters(cached)
    second = complete(cached, prompt)
    q2, h2 = counters(cached)
    n = first["usage"]["prompt_tokens"]
    assert n > 2 * BLOCK_SIZE
    assert cached_tokens(first) == 0 and h1 - h0 == 0
    hit = cached_tokens(second)
    assert 0 < hit < n and hit % BLOCK_SIZE == 0
    assert hit == (n - 1) // BLOCK_SIZE * BLOCK_SIZE     # all full blocks but the last token
    assert h2 - h1 == hit
    assert q1 - q0 == n and q2 - q1 == n
    assert second["choices"][0]["text"] == first["choices"][0]["text"]


def test_another_budget_does_not_hit(cached):
    prompt = "Two: " + STORY
    assert cached_tokens(complete(cached, prompt, think_budget=0.25)) == 0
    assert cached_tokens(complete(cached, prompt, think_budget=1.0)) == 0
    assert cached_tokens(complete(cached, prompt, think_budget=0.25)) > 0


def test_chat_streamed_and_whole(cached):
    messages = [{"role": "system", "content": "Three. " + STORY},
                {"role": "user", "content": "What was the first day?"}]
    first = post(cached, "/v1/chat/completions", messages=messages)
    assert cached_tokens(first) == 0
    whole = post(cached, "/v1/chat/completions", messages=messages)
    hit = cached_tokens(whole)
    assert 0 < hit < whole["usage"]["prompt_tokens"] and hit % BLOCK_SIZE == 0
    chunks = list(cached.client().chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == hit
    streamed = cached.client().completions.create(
        model=MODEL_NAME, prompt="Four: " + STORY, max_tokens=3, stream=True,
        stream_options={"include_usage": True})
    assert list(streamed)[-1].usage.prompt_tokens_details.cached_tokens == 0


def test_prompts_sum_and_choices_count_once(cached):
    a, b = "Five: " + STORY, "Six: " + STORY
    single = [complete(cached, p) for p in (a, b)]            # now both are cached
    hits = [cached_tokens(complete(cached, p)) for p in (a, b)]
    assert all(h > 0 for h in hits) and cached_tokens(single[0]) == 0
    both = complete(cached, [a, b])
    assert cached_tokens(both) == sum(hits)
    assert both["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in single)
    many = complete(cached, a, n=3, temperature=0.8, seed=1)
    assert len(many["choices"]) == 3 and cached_tokens(many) == hits[0]


def test_caching_off_reports_nothing_and_gives_the_same_outputs(cached, uncached):
    prompt = "Seven: " + STORY
    for budget in (0.0, 0.5, 1.0):
        on = [complete(cached, prompt, max_tokens=8, think_budget=budget, ignore_eos=True)
              for _ in range(2)]
        off = [complete(uncached, prompt, max_tokens=8, think_budget=budget, ignore_eos=True)
               for _ in range(2)]
        assert cached_tokens(on[1]) > 0
        assert [cached_tokens(r) for r in off] == [0, 0]
        texts = {r["choices"][0]["text"] for r in on + off}
        assert len(texts) == 1, (budget, texts)
    assert counters(uncached) == (0, 0)
