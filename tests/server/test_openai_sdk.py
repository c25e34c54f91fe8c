"""The unmodified openai SDK against the real server: completions (plain, streamed with
usage, n=2 with a seed, logprobs, echo), think_budget via extra_body, per-token thinking,
chat completions (plain and streamed), and the model list. What the server returns is compared
with the offline engine (``itt_runtime.llm.LLM``) on the same model: same tokens, text,
thinking depths and logprobs."""

from __future__ import annotations

import pytest
from live_server import MODEL_NAME

from itt_runtime.llm import LLM
from itt_runtime.outputs import CompletionOutput
from itt_runtime.sampling_params import SamplingParams
from itt_runtime.tokenizers import plain_chat

PROMPT = "And God said, Let there be light"
MAX_EXTRA = 4          # tiny model: 2 ITT layers x (3 - 1) routed steps


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> LLM:
    """The offline engine on the server's model, in this process."""
    return LLM(str(tiny_model_dir))


def offline(reference: LLM, prompt: str | list[int], **kw) -> list[CompletionOutput]:
    kw.setdefault("temperature", 0)
    return reference.generate([prompt], SamplingParams(**kw))[0].outputs


def mean(xs: list[int]) -> float:
    return sum(xs) / len(xs)


def test_completion_plain_equals_the_offline_engine(client, reference):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8,
                                  temperature=0)
    (want,) = offline(reference, PROMPT, max_tokens=8)
    assert want.text.strip()                               # the comparison is not vacuous
    assert r.object == "text_completion" and r.model == MODEL_NAME and r.id
    (choice,) = r.choices
    assert choice.index == 0
    assert choice.text == want.text and choice.finish_reason == want.finish_reason
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.prompt_tokens == len(reference.tokenizer.encode(PROMPT))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    thinking = r.usage.model_extra["thinking"]
    assert set(thinking) == {"think_budget", "applied_think_budget", "mean_extra_steps",
                             "mean_normalized_depth"}
    assert thinking["applied_think_budget"] == thinking["think_budget"]   # no elastic thinking
    assert thinking["mean_extra_steps"] == pytest.approx(mean(want.thinking))
    assert thinking["mean_normalized_depth"] == pytest.approx(
        thinking["mean_extra_steps"] / MAX_EXTRA)


def test_greedy_completion_equals_the_offline_engine_every_time(client, reference):
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0,
              extra_body={"ignore_eos": True})
    (want,) = offline(reference, PROMPT, max_tokens=12, ignore_eos=True)
    assert len(want.token_ids) == 12
    for _ in range(2):
        assert client.completions.create(**kw).choices[0].text == want.text


def test_completion_streamed_with_usage_and_thinking(client, reference):
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0,
              extra_body={"ignore_eos": True, "return_thinking": True})
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True,
                                            stream_options={"include_usage": True}, **kw))
    *token_chunks, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 10
    assert "".join(c.choices[0].text for c in token_chunks) == whole.choices[0].text
    assert token_chunks[-1].choices[0].finish_reason == "length"
    streamed_depths = [d for c in token_chunks for d in c.choices[0].model_extra["thinking"]]
    assert streamed_depths == whole.choices[0].model_extra["thinking"]
    (want,) = offline(reference, PROMPT, max_tokens=10, ignore_eos=True)
    assert streamed_depths == want.thinking and whole.choices[0].text == want.text
    assert usage_chunk.usage.model_extra["thinking"] == whole.usage.model_extra["thinking"]


def test_stream_without_usage_has_no_usage_chunk(client, reference):
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3,
                                            temperature=0, stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    (want,) = offline(reference, PROMPT, max_tokens=3)
    assert "".join(c.choices[0].text for c in chunks) == want.text


def test_n2_with_seed_is_reproducible_and_equals_the_offline_engine(client, reference):
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, n=2, seed=1234,
              temperature=1.0, extra_body={"ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text     # children are seeded seed+i
    assert a.usage.completion_tokens == 24
    want = offline(reference, PROMPT, max_tokens=12, n=2, seed=1234, temperature=1.0,
                   ignore_eos=True)
    assert [c.text for c in a.choices] == [w.text for w in want]


def test_multiple_prompts_number_choices_per_prompt(client, reference):
    prompts = ["In the beginning", "And God"]
    r = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=4, n=2,
                                  temperature=0.8, seed=3, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    want = [w.text for p in prompts for w in offline(reference, p, max_tokens=4, n=2,
                                                     temperature=0.8, seed=3,
                                                     ignore_eos=True)]
    assert [c.text for c in r.choices] == want


def test_logprobs_equal_the_offline_engines(client, reference):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5,
                                  temperature=0, logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    (want,) = offline(reference, PROMPT, max_tokens=5, logprobs=3, ignore_eos=True)
    assert lp.token_logprobs == pytest.approx(
        [entry[t] for entry, t in zip(want.logprobs, want.token_ids)], abs=1e-4)
    for top, entry in zip(lp.top_logprobs, want.logprobs):
        assert sorted(top.values()) == pytest.approx(sorted(set(entry.values()))[-len(top):],
                                                     abs=1e-4)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= 4 and top[token] == value
        assert value == pytest.approx(max(top.values()))          # greedy: chosen is best


def test_echo_with_logprobs_scores_the_prompt(client, reference):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=1,
                                  temperature=0, echo=True, logprobs=1)
    choice = r.choices[0]
    assert choice.text.startswith(PROMPT)
    lp = choice.logprobs
    ids = reference.tokenizer.encode(PROMPT)
    n_prompt = r.usage.prompt_tokens
    assert n_prompt == len(ids) and len(lp.token_logprobs) == n_prompt + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    (want,) = reference.generate([ids], SamplingParams(max_tokens=1, temperature=0,
                                                       prompt_logprobs=1, logprobs=1))
    prompt_lp = [want.prompt_logprobs[p][ids[p]] for p in range(1, n_prompt)]
    generated = want.outputs[0]
    assert lp.token_logprobs[1:] == pytest.approx(
        prompt_lp + [generated.logprobs[0][generated.token_ids[0]]], abs=1e-4)


def test_echo_without_logprobs(client):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3,
                                  temperature=0, echo=True)
    assert r.choices[0].text.startswith(PROMPT) and r.choices[0].logprobs is None


@pytest.mark.parametrize("budget", [0.0, 0.3, 1.0])
def test_think_budget_via_extra_body(client, reference, budget):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16,
                                  temperature=0, extra_body={"think_budget": budget,
                                                             "ignore_eos": True,
                                                             "return_thinking": True})
    thinking = r.usage.model_extra["thinking"]
    depths = r.choices[0].model_extra["thinking"]
    (want,) = offline(reference, PROMPT, max_tokens=16, think_budget=budget, ignore_eos=True)
    assert depths == want.thinking and r.choices[0].text == want.text
    assert thinking["think_budget"] == budget
    assert thinking["mean_extra_steps"] == pytest.approx(sum(depths) / len(depths))
    if budget == 0.0:
        assert depths == [0] * 16
    if budget == 1.0:
        assert depths == [MAX_EXTRA] * 16 and thinking["mean_normalized_depth"] == 1.0


def test_default_budget_is_the_models(client):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2)
    assert r.usage.model_extra["thinking"]["think_budget"] == 0.5   # tiny: train_capacity
    assert "thinking" not in r.choices[0].model_extra                # only when asked


def test_chat_completion_equals_the_offline_engine(client, reference, tiny_server):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Who made the light?"}]
    r = client.chat.completions.create(
        model=MODEL_NAME, max_tokens=6, temperature=0, messages=messages,
        extra_body={"return_thinking": True, "think_budget": 1.0})
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    with tiny_server.http() as http:
        ids = http.post("/tokenize", json={"model": MODEL_NAME,
                                           "messages": messages}).json()["tokens"]
    (want,) = offline(reference, ids, max_tokens=6, think_budget=1.0,
                      stop=[plain_chat.STOP])
    assert want.text.strip()
    assert msg.role == "assistant" and msg.content == want.text.lstrip()
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.choices[0].model_extra["thinking"] == [MAX_EXTRA] * r.usage.completion_tokens
    assert r.usage.model_extra["thinking"]["think_budget"] == 1.0


def test_chat_streamed_matches_whole(client):
    kw = dict(model=MODEL_NAME, max_tokens=8, temperature=0,
              messages=[{"role": "user", "content": "Say something"}],
              extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_logprobs_equal_the_offline_engines(client, reference, tiny_server):
    messages = [{"role": "user", "content": "Hello"}]
    r = client.chat.completions.create(model=MODEL_NAME, max_tokens=4, temperature=0,
                                       messages=messages, logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    with tiny_server.http() as http:
        ids = http.post("/tokenize", json={"model": MODEL_NAME,
                                           "messages": messages}).json()["tokens"]
    (want,) = offline(reference, ids, max_tokens=4, logprobs=2, ignore_eos=True,
                      stop=[plain_chat.STOP])
    assert len(content) == len(want.token_ids) == 4
    for entry, lp, tok in zip(content, want.logprobs, want.token_ids):
        assert entry.logprob == pytest.approx(lp[tok], abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            sorted(lp.values(), reverse=True)[:2], abs=1e-4)
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


def test_models_list(client):
    models = client.models.list()
    (card,) = models.data
    assert card.id == MODEL_NAME and card.object == "model"
    assert card.model_extra["max_model_len"] == 512
    assert card.model_extra["itt"]["max_extra_steps"] == MAX_EXTRA


def test_streamed_echo_with_logprobs_matches_whole(client):
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
              logprobs=1, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw)]
    assert "".join(c.text for c in chunks) == whole.text
    streamed = [lp for c in chunks for lp in c.logprobs.token_logprobs]
    assert streamed == whole.logprobs.token_logprobs
    assert [o for c in chunks for o in c.logprobs.text_offset] == whole.logprobs.text_offset


def test_streamed_multiple_prompts_and_choices(client):
    kw = dict(model=MODEL_NAME, prompt=["In the beginning", "And God"], max_tokens=5, n=2,
              temperature=0.9, seed=11, extra_body={"ignore_eos": True})
    whole = {c.index: c.text for c in client.completions.create(**kw).choices}
    texts: dict[int, str] = {}
    for chunk in client.completions.create(stream=True, **kw):
        (choice,) = chunk.choices
        texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == whole


def test_chat_streamed_n2_matches_whole(client):
    kw = dict(model=MODEL_NAME, max_tokens=5, n=2, temperature=0.9, seed=5,
              messages=[{"role": "user", "content": "Hi"}],
              extra_body={"ignore_eos": True, "return_thinking": True})
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    finished = [c.choices[0].index for c in chunks if c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices[0].index == choice.index]
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content
        depths = [d for c in mine for d in c.model_extra.get("thinking") or []]
        assert depths == choice.model_extra["thinking"] and len(depths) == 5
    assert whole.choices[0].message.content != whole.choices[1].message.content
