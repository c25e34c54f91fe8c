"""The openai SDK against the real server on a Hugging Face Llama directory with a chat
template: what tests/server/test_openai_sdk.py (which checks the SDK's requests against the
offline engine on the ITT test model) does not already cover.

- Structured outputs from a Pydantic model through every entry point of the SDK:
  ``client.chat.completions.parse``, the older ``client.beta.chat.completions.parse``, and
  the streaming ``client.chat.completions.stream(response_format=…)``: each parses into the
  model, and all three agree (greedy).
- ``stream_options={"include_usage": True}`` on chat and completions: the usage arrives once,
  in a last chunk without choices, and equals the non-streamed request's.
- Chat ``n`` with ``seed``: the same seed gives the same choices, and the choices differ.
- Chat ``logprobs``/``top_logprobs`` equal transformers' log-softmax on the chat template's
  prompt (an independent reference)."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from hf_models import load_hf
from hf_tokenizers import hf_reference
from live_server import MODEL_NAME
from openai import OpenAI
from pydantic import BaseModel, Field

MESSAGES = [{"role": "system", "content": "Short answers."},
            {"role": "user", "content": "Describe a pet."}]


class Pet(BaseModel):
    """Bounded fields, so that even a random model's answer ends well within max_tokens."""
    name: str = Field(max_length=8)
    kind: Literal["cat", "dog", "bird"]
    legs: int = Field(ge=0, le=4)


@pytest.fixture(scope="module")
def client(client_server) -> OpenAI:
    return client_server.client(timeout=60)


def greedy(**kw) -> dict:
    return {"model": MODEL_NAME, "messages": MESSAGES, "temperature": 0, **kw}


def test_parse_into_a_pydantic_model_through_every_entry_point(client):
    parsed = client.chat.completions.parse(response_format=Pet, max_tokens=60, **greedy())
    beta = client.beta.chat.completions.parse(response_format=Pet, max_tokens=60, **greedy())
    with client.chat.completions.stream(response_format=Pet, max_tokens=60,
                                        **greedy()) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta"]
        streamed = stream.get_final_completion()
    choices = [parsed.choices[0], beta.choices[0], streamed.choices[0]]
    for choice in choices:
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Pet)
        assert choice.message.parsed == Pet.model_validate_json(choice.message.content)
    assert choices[0].message.parsed == choices[1].message.parsed == choices[2].message.parsed
    assert len(deltas) > 1 and "".join(deltas) == choices[0].message.content
    # The schema is what shaped the reply: the same request without it is not a Pet.
    plain = client.chat.completions.create(max_tokens=60, **greedy())
    assert plain.choices[0].message.content != choices[0].message.content


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stream_usage_arrives_once_in_the_last_chunk(client, endpoint):
    if endpoint == "chat":
        kw = greedy(max_tokens=8, extra_body={"ignore_eos": True})
        create = client.chat.completions.create
    else:
        kw = {"model": MODEL_NAME, "prompt": "And God said", "max_tokens": 8,
              "temperature": 0, "extra_body": {"ignore_eos": True}}
        create = client.completions.create
    whole = create(**kw)
    *body, last = list(create(stream=True, stream_options={"include_usage": True}, **kw))
    assert body and all(c.usage is None and c.choices for c in body)
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) \
        == (whole.usage.prompt_tokens, 8, whole.usage.prompt_tokens + 8)
    assert whole.usage.completion_tokens == 8


def test_chat_n_with_seed_is_reproducible(client):
    kw = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, n=3, temperature=1.0,
              extra_body={"ignore_eos": True})
    first = client.chat.completions.create(seed=7, **kw)
    again = client.chat.completions.create(seed=7, **kw)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) == 3                       # each choice is its own sample
    assert first.usage.completion_tokens == 3 * 8


def test_chat_logprobs_equal_transformers(client, hf_chat_dir):
    steps, k = 5, 3
    r = client.chat.completions.create(logprobs=True, top_logprobs=k,
                                       **greedy(max_tokens=steps,
                                                extra_body={"ignore_eos": True}))
    content = r.choices[0].logprobs.content
    assert len(content) == steps
    tok = hf_reference(hf_chat_dir)
    ids = tok(tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    model = load_hf(hf_chat_dir)
    for entry in content:
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
        top = torch.topk(logprobs, k)
        assert entry.logprob == pytest.approx(float(top.values[0]), abs=1e-4)   # greedy
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            top.values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].logprob == entry.logprob
        ids.append(int(top.indices[0]))
