"""No silent no-ops: every request field OpenAI or vLLM defines either works or is a 400 that
names it. The cheap vLLM fields (add_special_tokens, truncate_prompt_tokens,
add_generation_prompt, continue_final_message, chat_template_kwargs, echo in chat) change
the prompt exactly as documented; informational fields are accepted."""

from __future__ import annotations

import pytest

from itt_runtime.tokenizers.chat_template import ChatTemplate
from itt_runtime.tokenizers.plain_chat import PLAIN_CHAT_TEMPLATE
from server.protocol import UNSUPPORTED_CHAT, UNSUPPORTED_COMMON, ChatMessage

MSGS = [{"role": "user", "content": "Say something."}]
PLAIN = ChatTemplate(PLAIN_CHAT_TEMPLATE, "plain", {})   # the tiny model's template
# A value for each unsupported field that is not one of its no-op values.
BAD = {"priority": 1, "use_beam_search": True, "length_penalty": 0.5,
       "spaces_between_special_tokens": False, "allowed_token_ids": [1, 2],
       "bad_words": ["x"], "logits_processors": ["a"], "return_tokens_as_token_ids": True,
       "return_token_ids": True, "cache_salt": "s", "kv_transfer_params": {"a": 1},
       "vllm_xargs": {"a": 1}, "request_id": "r", "guided_whitespace_pattern": " ",
       "structural_tag": "{}", "service_tier": "flex",
       "functions": [{"name": "f"}],
       "function_call": "auto", "audio": {"voice": "x"}, "modalities": ["audio"],
       "prediction": {"type": "content", "content": "x"}, "reasoning_effort": "low",
       "web_search_options": {}, "verbosity": "low", "chat_template": "{{ x }}",
       "documents": [{"text": "x"}], "mm_processor_kwargs": {"a": 1}}
NOOP = {"priority": 0, "use_beam_search": False, "length_penalty": 1.0,
        "spaces_between_special_tokens": True, "bad_words": [], "service_tier": "auto",
        "return_token_ids": False, "tool_choice": "none", "modalities": ["text"]}
INFORMATIONAL = {"user": "u", "metadata": {"k": "v"}, "store": False,
                 "prompt_cache_key": "k", "safety_identifier": "s"}


def test_every_unsupported_field_has_a_test_value():
    assert set(BAD) == set(UNSUPPORTED_COMMON) | set(UNSUPPORTED_CHAT)


@pytest.mark.parametrize("field", sorted(UNSUPPORTED_COMMON))
def test_unsupported_field_is_400_in_completions(tiny_server, field):
    r = tiny_server.http().post("/v1/completions", json={"prompt": "x", "max_tokens": 2,
                                                         field: BAD[field]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


@pytest.mark.parametrize("field", sorted(set(UNSUPPORTED_COMMON) | set(UNSUPPORTED_CHAT)))
def test_unsupported_field_is_400_in_chat(tiny_server, field):
    r = tiny_server.http().post("/v1/chat/completions", json={"messages": MSGS,
                                                              "max_tokens": 2,
                                                              field: BAD[field]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_noop_values_and_informational_fields_are_accepted(tiny_server):
    http = tiny_server.http()
    body = {"max_tokens": 2, **NOOP, **INFORMATIONAL}
    assert http.post("/v1/chat/completions", json={"messages": MSGS, **body}).status_code == 200
    body = {k: v for k, v in body.items() if k not in UNSUPPORTED_CHAT}
    assert http.post("/v1/completions", json={"prompt": "x", **body}).status_code == 200


def usage(http, path: str, **body) -> dict:
    r = http.post(path, json={"max_tokens": 1, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_add_special_tokens_and_truncate_prompt_tokens(tiny_server, tokenizer):
    http = tiny_server.http()
    prompt = "And God said, Let there be light"
    n = len(tokenizer.encode(prompt))
    assert usage(http, "/v1/completions", prompt=prompt)["usage"]["prompt_tokens"] == n
    assert usage(http, "/v1/completions", prompt=prompt,
                 add_special_tokens=False)["usage"]["prompt_tokens"] == n - 1
    out = usage(http, "/v1/completions", prompt=prompt, truncate_prompt_tokens=3, echo=True)
    assert out["usage"]["prompt_tokens"] == 3
    kept = tokenizer.encode(prompt)[-3:]
    assert out["choices"][0]["text"].startswith(tokenizer.decode(kept))
    ids = list(range(5, 25))
    assert usage(http, "/v1/completions", prompt=ids,
                 truncate_prompt_tokens=-1)["usage"]["prompt_tokens"] == 20
    chat = usage(http, "/v1/chat/completions", messages=MSGS, truncate_prompt_tokens=4)
    assert chat["usage"]["prompt_tokens"] == 4
    for bad in (0, -2):
        r = http.post("/v1/completions", json={"prompt": prompt,
                                               "truncate_prompt_tokens": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens"


def test_chat_template_controls(tiny_server, tokenizer):
    http = tiny_server.http()
    full = PLAIN.render(_msgs(MSGS))
    assert usage(http, "/v1/chat/completions", messages=MSGS)["usage"]["prompt_tokens"] == \
        len(tokenizer.encode(full))
    bare = PLAIN.render(_msgs(MSGS), add_generation_prompt=False)
    for body in ({"add_generation_prompt": False},
                 {"chat_template_kwargs": {"add_generation_prompt": False}}):
        assert usage(http, "/v1/chat/completions", messages=MSGS,
                     **body)["usage"]["prompt_tokens"] == len(tokenizer.encode(bare))
    cont = MSGS + [{"role": "assistant", "content": "The light"}]
    text = PLAIN.render(_msgs(cont), add_generation_prompt=False)[:-1]
    out = usage(http, "/v1/chat/completions", messages=cont, continue_final_message=True,
                add_generation_prompt=False, echo=True, max_tokens=4)
    assert out["usage"]["prompt_tokens"] == len(tokenizer.encode(text))
    assert out["choices"][0]["message"]["content"].startswith("The light")
    for body, param in (({"continue_final_message": True}, "continue_final_message"),
                        ({"chat_template_kwargs": {"messages": []}},
                         "chat_template_kwargs")):
        r = http.post("/v1/chat/completions", json={"messages": cont, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = http.post("/v1/chat/completions", json={"messages": MSGS, "add_generation_prompt":
                                                False, "continue_final_message": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"


def test_chat_echo_streams_the_last_message_first(tiny_server):
    client = tiny_server.client()
    cont = MSGS + [{"role": "assistant", "content": "Once"}]
    stream = client.chat.completions.create(
        model="tiny-itt", messages=cont, max_tokens=3, temperature=0, stream=True,
        extra_body={"echo": True, "continue_final_message": True,
                    "add_generation_prompt": False})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.startswith("Once")


def test_prompt_logprobs_as_vllm(tiny_server, tokenizer):
    http = tiny_server.http()
    ids = tokenizer.encode("And God said, Let there be light")
    echo = usage(http, "/v1/completions", prompt=ids, echo=True, logprobs=2)
    scored = echo["choices"][0]["logprobs"]["token_logprobs"]
    out = usage(http, "/v1/completions", prompt=ids, prompt_logprobs=2)
    plp = out["choices"][0]["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for j in range(1, len(ids)):
        entry = plp[j]
        assert entry[str(ids[j])]["logprob"] == pytest.approx(scored[j], abs=1e-5)
        ranks = sorted(e["rank"] for e in entry.values() if e["rank"] is not None)
        assert ranks == [1, 2]
        best = max(entry.values(), key=lambda e: e["logprob"])
        assert best["rank"] == 1
    chat = usage(http, "/v1/chat/completions", messages=MSGS, prompt_logprobs=0)
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    assert all(len(e) == 1 for e in chat["prompt_logprobs"][1:])
    assert "prompt_logprobs" not in usage(http, "/v1/completions", prompt=ids)["choices"][0]
    for body in ({"stream": True, "prompt_logprobs": 1},
                 {"echo": True, "logprobs": 1, "prompt_logprobs": 2}):
        r = http.post("/v1/completions", json={"prompt": ids, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"


def _msgs(ms):
    return [ChatMessage(**m) for m in ms]
