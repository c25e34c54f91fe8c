"""Chat templates: the model's own Jinja template rendered as transformers'
``apply_chat_template`` renders it (a ChatML/Qwen-style template written here and the
Llama-3-style one of ``hf_tokenizers``), the sandbox and its helpers, and through the real
server: the template from tokenizer_config.json, ``--chat-template FILE``, no template → 400,
a raising template → 400, ``/tokenizer_info``; and exact streaming (multi-byte characters,
stop strings across tokens) with a byte-level BPE tokenizer.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager

import httpx
import pytest
from fastapi.testclient import TestClient
from hf_tokenizers import HERMES_TOOLS, LLAMA3, hf_reference, write_byte_level_tokenizer
from live_server import launch

from itt_runtime.engine.async_engine import AsyncLLMEngine
from itt_runtime.engine.llm_engine import EngineConfig
from itt_runtime.tokenizers.chat_template import ChatTemplate, ChatTemplateError
from itt_runtime.tokenizers.loader import load_tokenizer
from server import cli
from server.app import create_app
from server.config import ServerSettings
from server.protocol import ChatMessage

# Qwen-style ChatML: a default system prompt, tojson of a message's name, an
# ``enable_thinking`` switch (Qwen 3's chat_template_kwargs), no BOS.
CHATML = """{%- if messages[0]['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant. Today is {{ strftime_now('%Y-%m-%d') }}.<|im_end|>
{% endif %}
{%- for message in messages %}
<|im_start|>{{ message['role'] }}{% if message.name %} {{ message.name | tojson }}{% endif %}

{{ message['content'] }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% endif %}
{%- endif %}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi  "},
     {"role": "assistant", "content": " Hello. "}, {"role": "user", "content": "How?"}],
    [{"role": "user", "content": "naïve 日本語 😀", "name": "ünï"},
     {"role": "assistant", "content": "ok"}],
    [{"role": "user", "content": "{% raw %}not {{ code }}{% endraw %}\n\nline two"}],
]
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "hermes_tools": HERMES_TOOLS}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city, now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
# A tool round trip: the call, the tool's answer, and the next user turn.
TOOL_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "24 C, clear"},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A byte-level tokenizer of 511 learned + 1 added = 512 tokens (the tiny model's)."""
    return write_byte_level_tokenizer(tmp_path_factory.mktemp("tok"), 511)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def ours(tok, source: str) -> ChatTemplate:
    return ChatTemplate(source, "test", {"bos_token": tok.bos_token, "eos_token": tok.eos_token})


def messages(conversation) -> list[ChatMessage]:
    return [ChatMessage(**m) for m in conversation]


@pytest.fixture(scope="module")
def refs(tok_dir, tmp_path_factory):
    """transformers' tokenizer with each template."""
    out = {}
    for name, source in TEMPLATES.items():
        d = tmp_path_factory.mktemp(name)
        shutil.copytree(tok_dir, d, dirs_exist_ok=True)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": source}))
        out[name] = hf_reference(d)
    return out


# ---- rendering = transformers ---------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_matches_transformers(tok, refs, name, conversation, add_generation_prompt):
    want = refs[name].apply_chat_template(conversation, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
    got = ours(tok, TEMPLATES[name]).render(messages(conversation), add_generation_prompt)
    assert got == want


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_continue_final_message_matches_transformers(tok, refs, name):
    conversation = CONVERSATIONS[1] + [{"role": "assistant", "content": "The answer is "}]
    want = refs[name].apply_chat_template(conversation, tokenize=False,
                                          continue_final_message=True)
    got = ours(tok, TEMPLATES[name]).render(messages(conversation), True,
                                            continue_final_message=True)
    assert got == want and got.endswith("The answer is" + ("" if name == "llama3" else " "))


def test_template_kwargs_match_transformers(tok, refs):
    conversation = CONVERSATIONS[0]
    for value in (False, True):
        want = refs["chatml"].apply_chat_template(conversation, tokenize=False,
                                                  add_generation_prompt=True,
                                                  enable_thinking=value)
        got = ours(tok, CHATML).render(messages(conversation), kwargs={"enable_thinking": value})
        assert got == want
    assert "<think>" in ours(tok, CHATML).render(messages(conversation),
                                                 kwargs={"enable_thinking": False})


def _with_argument_objects(conversation):
    """The conversation as transformers' templates expect it: a call's arguments an object
    (OpenAI clients send JSON text, which the server parses for the template, as vLLM)."""
    out = []
    for m in conversation:
        m = dict(m)
        if "tool_calls" in m:
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(
                c["function"]["arguments"])}} for c in m["tool_calls"]]
        out.append(m)
    return out


@pytest.mark.parametrize("conversation", [CONVERSATIONS[1], TOOL_CONVERSATION])
def test_tools_render_as_transformers(tok, refs, conversation):
    want = refs["hermes_tools"].apply_chat_template(
        _with_argument_objects(conversation), tools=[WEATHER], tokenize=False,
        add_generation_prompt=True)
    got = ours(tok, HERMES_TOOLS).render(messages(conversation), tools=[WEATHER])
    assert got == want and '{"name": "get_weather", "description"' in got
    if conversation is TOOL_CONVERSATION:
        assert '"name": "get_weather", "arguments": {"city": "Rome"}' in got
        assert "<tool_response>\n24 C, clear\n</tool_response>" in got


def test_a_template_without_tools_gets_the_hermes_fallback(tok):
    from itt_runtime.tokenizers.chat_template import FALLBACK_PREAMBLE
    from itt_runtime.tokenizers.plain_chat import PLAIN_CHAT_TEMPLATE
    template = ours(tok, PLAIN_CHAT_TEMPLATE)
    assert not template.supports_tools and ours(tok, HERMES_TOOLS).supports_tools
    text = template.render(messages(TOOL_CONVERSATION), tools=[WEATHER])
    assert text == (
        f"{tok.bos_token}{FALLBACK_PREAMBLE}\n{json.dumps(WEATHER['function'])}\n\n"
        "Be brief.\n\n"
        "User: Weather in Paris and Rome?\n"
        'Assistant: Checking.\n<tool_call>{"name": "get_weather", "arguments": {"city": '
        '"Paris"}}</tool_call>\n<tool_call>{"name": "get_weather", "arguments": {"city": '
        '"Rome"}}</tool_call>\n'
        "User: <tool_response>18 C, sunny</tool_response>\n"
        "User: <tool_response>24 C, clear</tool_response>\n"
        "Assistant:")
    # Without tools and tool messages the conversation renders as before.
    plain = messages(CONVERSATIONS[1])
    assert template.render(plain) == template.render(plain, tools=None)
    assert FALLBACK_PREAMBLE not in template.render(plain)


# ---- errors and the sandbox -----------------------------------------------------------------
def test_raise_exception_is_a_chat_template_error(tok):
    with pytest.raises(ChatTemplateError, match="Unsupported role: developer"):
        ours(tok, LLAMA3).render(messages([{"role": "developer", "content": "x"}]))


@pytest.mark.parametrize("source, message", [
    ("{{ messages.append(1) }}", "unsafe|not safely callable|immutable"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe|undefined|has no attribute"),
    ("{{ 1 / 0 }}", "division by zero"),
    ("{{ nope.attr }}", "undefined"),
])
def test_a_failing_template_is_an_error_not_a_crash(tok, source, message):
    with pytest.raises(ChatTemplateError, match=message):
        ours(tok, source).render(messages(CONVERSATIONS[0]))


def test_syntax_error_and_no_template(tok):
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ours(tok, "{% for x in %}").render(messages(CONVERSATIONS[0]))
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ChatTemplate(None, "test", {}).render(messages(CONVERSATIONS[0]))


def test_tojson_keeps_non_ascii(tok):
    t = ours(tok, "{{ messages[0] | tojson }}|{{ {'b': 1, 'a': [1, 2]} | tojson(indent=1) }}")
    text = t.render(messages([{"role": "user", "content": "日本 <b>"}]))
    assert text.startswith('{"role": "user", "content": "日本 <b>"}|')
    assert json.loads(text.split("|", 1)[1]) == {"b": 1, "a": [1, 2]}


# ---- through the server ---------------------------------------------------------------------
def model_dir(tiny_model_dir, tok_dir, out, template: str | None):
    """The tiny ITT model with the byte-level tokenizer (and ``template``, if any)."""
    shutil.copytree(tiny_model_dir, out)
    (out / "tokenizer.model").unlink()
    (out / "tokenizer_config.json").unlink(missing_ok=True)
    shutil.copytree(tok_dir, out, dirs_exist_ok=True)
    tok = load_tokenizer(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    (out / "config.json").write_text(json.dumps(cfg))
    if template is not None:
        tc = json.loads((out / "tokenizer_config.json").read_text())
        (out / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": template}))
    return out


@pytest.fixture(scope="module")
def chatml_dir(tiny_model_dir, tok_dir, tmp_path_factory):
    return model_dir(tiny_model_dir, tok_dir, tmp_path_factory.mktemp("m") / "chatml", CHATML)


@pytest.fixture(scope="module")
def chatml_server(chatml_dir, tmp_path_factory):
    server = launch(chatml_dir, tmp_path_factory.mktemp("log"), "--kv-cache-memory", "32MiB")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def bare_dir(tiny_model_dir, tok_dir, tmp_path_factory):
    return model_dir(tiny_model_dir, tok_dir, tmp_path_factory.mktemp("m") / "bare", None)


def chat(http: httpx.Client, conversation, **body) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"messages": conversation, "max_tokens": 3,
                                                   "temperature": 0, **body})


def test_server_uses_the_models_template(chatml_server, tok, refs):
    http = chatml_server.http()
    info = http.get("/tokenizer_info").json()
    assert info["chat_template"] == CHATML
    assert info["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (info["bos_token"], info["eos_token"]) == (tok.bos_token, tok.eos_token)
    for conversation in CONVERSATIONS:
        text = refs["chatml"].apply_chat_template(conversation, tokenize=False,
                                                  add_generation_prompt=True)
        want = refs["chatml"](text, add_special_tokens=False)["input_ids"]
        got = http.post("/tokenize", json={"messages": conversation}).json()["tokens"]
        assert got == want
        r = chat(http, conversation)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(want)
    # chat_template_kwargs reach the template.
    off = chat(http, CONVERSATIONS[0], chat_template_kwargs={"enable_thinking": False})
    on = chat(http, CONVERSATIONS[0])
    assert off.json()["usage"]["prompt_tokens"] > on.json()["usage"]["prompt_tokens"]


def stream_text(http: httpx.Client, path: str, body: dict) -> tuple[str, list]:
    """The streamed deltas joined, and the finish reasons seen."""
    text, finish = "", []
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for c in json.loads(line[6:])["choices"]:
                text += c.get("text") or (c.get("delta") or {}).get("content") or ""
                if c.get("finish_reason"):
                    finish.append(c["finish_reason"])
    return text, finish


TARGETS = ["naïve café — 日本語 😀 Ωμέγα", "😀😀😀 ok Ω日 👩‍👩‍👧", "中文文本，标点。 ß ø é"]


@pytest.mark.parametrize("target", TARGETS)
def test_streaming_multibyte_text_is_exact(chatml_server, tok, target):
    """The model is constrained to spell ``target`` (any token split the grammar allows, so
    characters split across byte tokens): streamed deltas = the whole text = the target."""
    http = chatml_server.http()
    for seed in range(2):
        body = {"prompt": "Say:", "max_tokens": 200, "temperature": 1.0, "seed": seed,
                "guided_choice": [target]}
        whole = http.post("/v1/completions", json=body).json()["choices"][0]
        streamed, finish = stream_text(http, "/v1/completions", body)
        assert streamed == whole["text"] == target
        assert finish == ["stop"]
        conversation = [{"role": "user", "content": "Say it."}]
        streamed, _ = stream_text(http, "/v1/chat/completions",
                                  {"messages": conversation, "max_tokens": 200,
                                   "temperature": 1.0, "seed": seed, "guided_choice": [target]})
        assert streamed == target


@pytest.mark.parametrize("stop, cut", [("本語 😀", "naïve café — 日"), ("é — 日", "naïve caf"),
                                       ("😀 Ω", "naïve café — 日本語 ")])
@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_across_tokens(chatml_server, stop, cut, stream):
    http = chatml_server.http()
    body = {"prompt": "Say:", "max_tokens": 200, "temperature": 1.0, "seed": 1,
            "guided_choice": [TARGETS[0]], "stop": [stop]}
    for include in (False, True):
        b = {**body, "include_stop_str_in_output": include}
        if stream:
            text, finish = stream_text(http, "/v1/completions", b)
        else:
            c = http.post("/v1/completions", json=b).json()["choices"][0]
            text, finish = c["text"], [c["finish_reason"]]
            assert c["stop_reason"] == stop
        assert text == cut + (stop if include else "") and finish == ["stop"]


@contextmanager
def in_process(model, **settings):
    """The app in-process on the real engine (a second server process costs ~10 s here)."""
    engine = AsyncLLMEngine(EngineConfig(model=str(model), device="cpu",
                                         kv_cache_memory=16 * 2**20))
    engine.start()
    try:
        with TestClient(create_app(engine, ServerSettings(("m",), **settings))) as http:
            yield http
    finally:
        engine.shutdown()


def check_no_template(http) -> None:
    r = chat(http, CONVERSATIONS[0])
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "no chat template" in error["message"] and "--chat-template" in error["message"]
    assert error["param"] == "messages"
    assert http.post("/tokenize", json={"messages": CONVERSATIONS[0]}).status_code == 400
    assert http.get("/tokenizer_info").json()["chat_template"] is None
    assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}) \
        .status_code == 200


def check_llama3_flag(http, tok, refs) -> None:
    assert http.get("/tokenizer_info").json()["chat_template"] == LLAMA3
    text = refs["llama3"].apply_chat_template(CONVERSATIONS[1], tokenize=False,
                                              add_generation_prompt=True)
    want = refs["llama3"](text, add_special_tokens=False)["input_ids"]
    assert want[0] == tok.bos_token_id and want[1] != tok.bos_token_id    # BOS once
    r = chat(http, CONVERSATIONS[1])
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(want)
    assert http.post("/tokenize", json={"messages": CONVERSATIONS[1]}).json()["tokens"] == want
    r = chat(http, [{"role": "developer", "content": "x"}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert r.json()["error"]["message"] == "the chat template failed: Unsupported role: developer"


def test_no_template_is_a_400(bare_dir):
    """Without a template chat is a 400 naming the problem; completions still work."""
    with in_process(bare_dir) as http:
        check_no_template(http)


def test_chat_template_setting_replaces_the_models(chatml_dir, tok, refs, tmp_path):
    """--chat-template's setting: that template is used and reported (the model's own is
    ChatML), and its raise_exception is a 400 with the message."""
    template = tmp_path / "llama3.jinja"
    template.write_text(LLAMA3)
    with in_process(chatml_dir, chat_template=str(template)) as http:
        check_llama3_flag(http, tok, refs)


@pytest.mark.slow
def test_no_template_and_chat_template_flag_real_server(bare_dir, tok, refs, tmp_path):
    """The two tests above through real server processes (the flag as typed)."""
    server = launch(bare_dir, tmp_path, "--kv-cache-memory", "32MiB")
    try:
        check_no_template(server.http())
    finally:
        server.stop()
    template = tmp_path / "llama3.jinja"
    template.write_text(LLAMA3)
    server = launch(bare_dir, tmp_path, "--kv-cache-memory", "32MiB",
                    "--chat-template", str(template))
    try:
        check_llama3_flag(server.http(), tok, refs)
        assert "Traceback" not in server.log()
    finally:
        server.stop()


@pytest.mark.parametrize("content, message", [
    (None, "unreadable"), ("{% for %}", "does not compile")])
def test_bad_chat_template_file_is_one_line_at_startup(bare_dir, tmp_path, capsys, content,
                                                       message):
    """Checked before the model loads: one line on stderr, exit 1, no traceback."""
    file = tmp_path / "t.jinja"
    if content is not None:
        file.write_text(content)
    rc = cli.main(["--model", str(bare_dir), "--device", "cpu", "--port", "0",
                   "--chat-template", str(file)])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and err.startswith("itt-server: error: --chat-template ")
    assert message in err and str(file) in err and "Traceback" not in err
