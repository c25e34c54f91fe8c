"""In-process pieces: the plain chat template, prompt encoding with special
tokens, bucket helpers, and an error in mid-stream becoming an error chunk and [DONE]."""

from __future__ import annotations

import json

import jinja2
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from itt_runtime.engine.async_engine import AsyncLLMEngine
from itt_runtime.engine.llm_engine import EngineConfig
from itt_runtime.tokenizers.chat_template import ChatTemplate
from itt_runtime.tokenizers.plain_chat import PLAIN_CHAT_TEMPLATE
from server.app import create_app
from server.config import ServerSettings
from server.engine_client import EngineClient
from server.errors import APIError
from server.metrics import buckets_1_2_5
from server.protocol import ChatMessage
from server.tokens import encode

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "How?"}],
    [{"role": "developer", "content": "Short answers."}, {"role": "user", "content": "Why"}],
]


PLAIN = ChatTemplate(PLAIN_CHAT_TEMPLATE, "plain", {})


def test_chat_template_renders_plain_turns():
    msgs = [ChatMessage(**m) for m in CONVERSATIONS[1]]
    assert PLAIN.render(msgs) == \
        "Be kind.\n\nUser: Hi\nAssistant: Hello.\nUser: How?\nAssistant:"
    assert PLAIN.render(msgs, add_generation_prompt=False).endswith("User: How?\n")
    parts = ChatMessage(role="user", content=[{"type": "text", "text": "a"},
                                               {"type": "text", "text": "b"}])
    assert PLAIN.render([parts]) == "User: ab\nAssistant:"


def python_render(messages, add_generation_prompt=True):
    """The plain format as Python (how it was rendered before it became a Jinja template)."""
    system = "\n".join(m["content"] for m in messages if m["role"] in ("system", "developer"))
    parts = [f"{system}\n\n"] if system else []
    names = {"user": "User", "assistant": "Assistant"}
    parts += [f"{names[m['role']]}: {m['content']}\n" for m in messages if m["role"] in names]
    return "".join(parts) + ("Assistant:" if add_generation_prompt else "")


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_plain_template_matches_python(conversation, add_generation_prompt):
    """In the sandbox with trim_blocks/lstrip_blocks (as served) and in a bare environment
    (as a client might render /tokenizer_info's template), the text is unchanged."""
    bare = jinja2.Environment().from_string(PLAIN_CHAT_TEMPLATE).render(
        messages=conversation, add_generation_prompt=add_generation_prompt)
    served = PLAIN.render([ChatMessage(**m) for m in conversation], add_generation_prompt)
    assert served == bare == python_render(conversation, add_generation_prompt)


def test_encode_maps_special_token_strings(tokenizer):
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    assert encode(tokenizer, tokenizer.eos_token, add_special_tokens=False) == [eos]
    ids = encode(tokenizer, "In the beginning</s>And")
    assert ids[0] == bos and eos in ids
    assert encode(tokenizer, "In the beginning") == tokenizer.encode("In the beginning")


def test_token_buckets():
    assert buckets_1_2_5(512) == [1, 2, 5, 10, 20, 50, 100, 200, 500]
    assert buckets_1_2_5(1) == [1]


@pytest.fixture(scope="module")
def app_client(tiny_model_dir):
    engine = AsyncLLMEngine(EngineConfig(model=str(tiny_model_dir), device="cpu",
                                         kv_cache_memory=16 * 2**20))
    engine.start()
    with TestClient(create_app(engine, ServerSettings(("m",)))) as http:
        yield http
    engine.shutdown()


def test_error_mid_stream_is_an_error_chunk_then_done(app_client, monkeypatch):
    real = EngineClient.generate

    async def failing(self, *args, **kwargs):
        async for i, out in enumerate_async(real(self, *args, **kwargs)):
            if i == 2:
                raise APIError(503, "the engine died", type="server_error", code="engine_dead")
            yield out

    monkeypatch.setattr(EngineClient, "generate", failing)
    with app_client.stream("POST", "/v1/completions", json={
            "prompt": "In the beginning", "max_tokens": 10, "stream": True}) as resp:
        assert resp.status_code == 200
        events = [line[len("data: "):] for line in resp.iter_lines() if line]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "engine_dead" and error["type"] == "server_error"
    assert all("choices" in json.loads(e) for e in events[:-2]) and len(events) == 4


async def enumerate_async(gen):
    i = 0
    async for item in gen:
        yield i, item
        i += 1


def test_health_is_503_when_the_engine_is_dead(app_client, monkeypatch):
    assert app_client.get("/health").status_code == 200
    monkeypatch.setattr(AsyncLLMEngine, "is_alive", property(lambda self: False))
    assert app_client.get("/health").status_code == 503
    resp = app_client.post("/v1/completions", json={"prompt": "x"})
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "engine_dead"


def test_dense_model_serves_and_exports_metrics(tiny_dense_dir):
    """A plain LLaMA model (no ITT layers): depth is always 0 and there are no routed series."""
    engine = AsyncLLMEngine(EngineConfig(model=str(tiny_dense_dir), device="cpu",
                                                kv_cache_memory=2**20))
    engine.start()
    try:
        with TestClient(create_app(engine, ServerSettings(("dense",)))) as http:
            r = http.post("/v1/completions", json={"prompt": "In", "max_tokens": 3,
                                                   "return_thinking": True}).json()
            assert r["choices"][0]["thinking"] == [0, 0, 0]
            assert r["usage"]["thinking"]["mean_normalized_depth"] == 0.0
            text = http.get("/metrics").text
        names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
        assert "itt_block_applications_max_total" in names
        assert "itt_routed_tokens_total" not in names
    finally:
        engine.shutdown()
