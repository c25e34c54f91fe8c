"""Smoke test with the shipped default model (``--model default``, its served name is
``default``): the SDK round trip, budgets honoured, streaming, chat, metrics. Replies are
compared with the offline engine on the same model and must not be empty. Skipped only while
itt_runtime/checkpoints/default/ does not exist (it is produced by training)."""

from __future__ import annotations

import pytest
from live_server import launch, metric

from itt_runtime.checkpoints import DEFAULT_MODEL_DIR
from itt_runtime.llm import LLM
from itt_runtime.sampling_params import SamplingParams
from itt_runtime.tokenizers import plain_chat

pytestmark = pytest.mark.skipif(not DEFAULT_MODEL_DIR.is_dir(),
                                reason="the default model has not been trained yet")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = launch("default", tmp_path_factory.mktemp("default_model"), served_name=None,
                 ready_timeout=180)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference():
    return LLM("default", device="cpu")


def greedy(reference: LLM, prompt, **kw):
    return reference.generate([prompt], SamplingParams(temperature=0, **kw))[0].outputs[0]


def test_default_model_serves_completions_with_budgets(server, reference):
    client = server.client(timeout=120)
    (card,) = client.models.list().data
    assert card.id == "default"
    max_extra = card.model_extra["itt"]["max_extra_steps"]
    for budget in (0.0, 1.0):
        r = client.completions.create(model="default", prompt="And God said", max_tokens=8,
                                      temperature=0, extra_body={"think_budget": budget,
                                                                 "return_thinking": True})
        depths = r.choices[0].model_extra["thinking"]
        want = greedy(reference, "And God said", max_tokens=8, think_budget=budget)
        assert want.text.strip() and r.choices[0].text == want.text and depths == want.thinking
        assert depths == [0 if budget == 0.0 else max_extra] * len(depths)
        assert r.usage.model_extra["thinking"]["think_budget"] == budget
    text = client.completions.create(model="default", prompt="In the beginning",
                                     max_tokens=8, temperature=0).choices[0].text
    assert text.strip() and text == greedy(reference, "In the beginning", max_tokens=8).text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="default", prompt="In the beginning", max_tokens=8, temperature=0,
        stream=True))
    assert streamed == text


def test_default_model_chat_and_metrics(server, reference):
    client = server.client(timeout=120)
    messages = [{"role": "user", "content": "Who is God?"}]
    r = client.chat.completions.create(model="default", max_tokens=12, temperature=0,
                                       messages=messages)
    with server.http() as http:
        ids = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    want = greedy(reference, ids, max_tokens=12, stop=[plain_chat.STOP]).text.lstrip()
    assert want and r.choices[0].message.content == want
    samples = server.metrics()
    assert metric(samples, "itt_request_success_total", finished_reason="length") + \
        metric(samples, "itt_request_success_total", finished_reason="stop") >= 1
    assert metric(samples, "itt_num_kv_blocks") > 0
