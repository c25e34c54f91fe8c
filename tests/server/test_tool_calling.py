"""Tool calling through the real server: ``tool_choice`` "required" and named functions give
valid calls (names declared, arguments valid against the schema) on the shipped default model
(whose plain template gets the Hermes fallback) and on a tiny Hugging Face model whose chat
template takes ``tools``; "auto" parses Hermes and Llama-3 JSON calls the model writes (made
to write them here by a regex, since random weights write no calls of their own); streamed
and whole responses are identical; each refusal is a 400 naming its field; the metrics
count tool requests and parse failures."""

from __future__ import annotations

import json

import httpx
import pytest
from hf_models import build_hf_chat_model
from hf_tokenizers import HERMES_TOOLS
from live_server import MODEL_NAME, launch, metric

from itt_runtime.checkpoints import DEFAULT_MODEL_DIR

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

CITY = {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city, now",
        "parameters": {"type": "object", "properties": {
            "city": CITY, "unit": {"type": "string", "enum": ["C", "F"]}},
            "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "integer", "minimum": -99, "maximum": 99},
            "b": {"type": "integer", "minimum": -99, "maximum": 99}},
            "required": ["a", "b"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "now", "description": "The time"}},
]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters",
                                                     {"type": "object", "properties": {}})
           for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return build_hf_chat_model(tmp_path_factory.mktemp("tools_model") / "llama", HERMES_TOOLS,
                               max_position_embeddings=2048)


@pytest.fixture(scope="module")
def hermes_server(hf_dir, tmp_path_factory):
    """The tiny HF model with tool calling as vLLM enables it."""
    srv = launch(hf_dir, tmp_path_factory.mktemp("hermes"), "--enable-auto-tool-choice",
                 "--tool-call-parser", "hermes")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """The shipped default model, no tool flags: "required"/named work, "auto" is refused."""
    if not DEFAULT_MODEL_DIR.is_dir():
        pytest.skip("the default model has not been trained yet")
    srv = launch("default", tmp_path_factory.mktemp("default_tools"), served_name=None,
                 ready_timeout=180)
    yield srv
    srv.stop()


def chat(server, **body) -> httpx.Response:
    body = {"messages": ASK, "tools": TOOLS, "max_tokens": 300, **body}
    return server.http().post("/v1/chat/completions", json=body)


def assert_valid_calls(message: dict, cut_short: bool = False) -> list[dict]:
    """Every call names a declared function with arguments valid against its schema; with
    ``cut_short`` (finish_reason "length") the last call's arguments may be unfinished."""
    calls = message["tool_calls"]
    assert calls, message
    for i, call in enumerate(calls):
        assert call["type"] == "function" and call["id"].startswith("call_")
        name = call["function"]["name"]
        assert name in SCHEMAS
        if not (cut_short and i == len(calls) - 1):
            jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])
    return calls


# ---- "required" and named: valid calls whatever the model -----------------------------------
@pytest.mark.parametrize("which", ["hermes_server", "default_server"])
def test_required_gives_valid_calls(request, which):
    """Sampled, one call each (``parallel_tool_calls: false``): always a complete, valid call.
    Parallel calls: as many as the model writes, each valid (a random model may go on
    writing calls until max_tokens; the last one is then cut short, as OpenAI's would be)."""
    server = request.getfixturevalue(which)
    names = set()
    for seed in range(6):
        r = chat(server, tool_choice="required", parallel_tool_calls=False, temperature=1.0,
                 seed=seed, n=2)
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            assert choice["finish_reason"] == "tool_calls", choice
            assert choice["message"]["content"] is None
            [call] = assert_valid_calls(choice["message"])
            names.add(call["function"]["name"])
    assert len(names) > 1                           # sampling reached more than one function
    r = chat(server, tool_choice="required", temperature=1.0, seed=0, n=4, max_tokens=120)
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] in ("tool_calls", "length")
        assert_valid_calls(choice["message"], cut_short=choice["finish_reason"] == "length")


@pytest.mark.parametrize("which", ["hermes_server", "default_server"])
@pytest.mark.parametrize("name", ["get_weather", "add", "now"])
def test_named_function_gives_a_valid_call_to_it(request, which, name):
    server = request.getfixturevalue(which)
    for seed in range(3):
        r = chat(server, tool_choice={"type": "function", "function": {"name": name}},
                 temperature=1.0, seed=seed)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop"          # OpenAI's, for a forced call
        [call] = assert_valid_calls(choice["message"])
        assert call["function"]["name"] == name


def test_parallel_tool_calls_false_gives_one_call(hermes_server):
    for seed in range(4):
        r = chat(hermes_server, tool_choice="required", parallel_tool_calls=False,
                 temperature=1.0, seed=seed)
        assert r.status_code == 200, r.text
        assert len(assert_valid_calls(r.json()["choices"][0]["message"])) == 1
    # The same grammar without the limit lets this model write more than one.
    r = chat(hermes_server, tool_choice="required", temperature=1.0, seed=0, n=4,
             max_tokens=120)
    assert max(len(c["message"]["tool_calls"]) for c in r.json()["choices"]) > 1


def stream_to_message(server, **body) -> tuple[dict, str]:
    """(the message, the finish reason) reassembled from a stream's tool-call deltas, the
    way the OpenAI SDK does: the first delta of a call carries id, type and name."""
    content, calls, finish = "", {}, None
    with server.http().stream("POST", "/v1/chat/completions",
                              json={"messages": ASK, "tools": TOOLS, "max_tokens": 300,
                                    "stream": True, **body}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            delta = choice["delta"]
            content += delta.get("content") or ""
            for d in delta.get("tool_calls") or []:
                if d["index"] not in calls:
                    assert set(d) == {"index", "id", "type", "function"}, d
                    calls[d["index"]] = {"id": d["id"], "type": d["type"], "function": {
                        "name": d["function"]["name"], "arguments": ""}}
                else:
                    assert set(d) == {"index", "function"} and "name" not in d["function"]
                calls[d["index"]]["function"]["arguments"] += d["function"]["arguments"]
            finish = choice["finish_reason"] or finish
    message = {"content": content or None,
               "tool_calls": [calls[i] for i in sorted(calls)] or None}
    return message, finish


def without_ids(message: dict) -> dict:
    calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
             for c in message.get("tool_calls") or []]
    return {"content": message["content"], "calls": calls}


@pytest.mark.parametrize("tool_choice", ["required",
                                         {"type": "function", "function": {"name": "add"}}])
def test_streamed_equals_whole(hermes_server, tool_choice):
    for seed in range(3):
        body = {"tool_choice": tool_choice, "temperature": 1.0, "seed": seed}
        whole = chat(hermes_server, **body).json()["choices"][0]
        streamed, finish = stream_to_message(hermes_server, **body)
        assert without_ids(streamed) == without_ids(whole["message"])
        assert finish == whole["finish_reason"]


# ---- "auto": the parsers on what the model writes -------------------------------------------
HERMES_REPLY = ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": '
                '{"city": "Rome", "unit": "C"}}\n</tool_call>\n<tool_call>\n{"name": "add", '
                '"arguments": {"a": 2, "b": 3}}\n</tool_call>')


def forced(text: str) -> dict:
    """A regex that makes the model write exactly ``text`` (then stop)."""
    import re
    return {"structured_outputs": {"regex": re.escape(text)}}


def test_auto_parses_hermes_calls(hermes_server):
    body = {"tool_choice": "auto", "temperature": 0, "max_tokens": 200, **forced(HERMES_REPLY)}
    whole = chat(hermes_server, **body).json()["choices"][0]
    assert whole["finish_reason"] == "tool_calls"
    message = whole["message"]
    assert message["content"] == "I will check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in assert_valid_calls(message)] == [
        ("get_weather", {"city": "Rome", "unit": "C"}), ("add", {"a": 2, "b": 3})]
    streamed, finish = stream_to_message(hermes_server, **body)
    assert without_ids(streamed) == without_ids(message) and finish == "tool_calls"


def test_auto_without_a_call_is_content(hermes_server):
    body = {"temperature": 0, "max_tokens": 200, **forced("Sunny, 20 C.")}   # auto: default
    choice = chat(hermes_server, **body).json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Sunny, 20 C."}
    assert choice["finish_reason"] == "stop"


def test_a_malformed_call_is_content_and_counted(hermes_server):
    before = hermes_server.metrics()
    bad = "<tool_call>\n{\"name\": \"launch_rockets\", \"arguments\": {}}\n</tool_call>"
    choice = chat(hermes_server, temperature=0, max_tokens=200, **forced(bad)).json()
    choice = choice["choices"][0]
    assert choice["message"]["content"] == bad and "tool_calls" not in choice["message"]
    assert choice["finish_reason"] == "stop"
    after = hermes_server.metrics()
    assert metric(after, "itt_tool_call_parse_failures_total", parser="hermes") - \
        metric(before, "itt_tool_call_parse_failures_total", parser="hermes") == 1
    assert metric(after, "itt_tool_call_requests_total", tool_choice="auto") - \
        metric(before, "itt_tool_call_requests_total", tool_choice="auto") == 1


def test_llama3_json_parser(hf_dir, tmp_path_factory):
    reply = '{"name": "add", "parameters": {"a": 1, "b": -1}}; {"name": "now", "parameters": {}}'
    srv = launch(hf_dir, tmp_path_factory.mktemp("llama3"), "--enable-auto-tool-choice",
                 "--tool-call-parser", "llama3_json")
    try:
        choice = chat(srv, temperature=0, max_tokens=200, **forced(reply)).json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        calls = assert_valid_calls(choice["message"])
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
            ("add", '{"a": 1, "b": -1}'), ("now", "{}")]
    finally:
        srv.stop()


def test_cut_short_call_keeps_its_arguments_so_far(hermes_server):
    body = {"tool_choice": "auto", "temperature": 0, "max_tokens": 200,
            **forced(HERMES_REPLY)}
    full = chat(hermes_server, **body).json()["choices"][0]
    ids = hermes_server.http().post("/tokenize", json={
        "prompt": HERMES_REPLY, "add_special_tokens": False}).json()["tokens"]
    cut = chat(hermes_server, **{**body, "max_tokens": len(ids) - 6}).json()["choices"][0]
    assert cut["finish_reason"] == "length"
    first, last = full["message"]["tool_calls"][0], cut["message"]["tool_calls"][-1]
    assert cut["message"]["tool_calls"][0]["function"] == first["function"]
    assert last["function"]["name"] == "add"
    assert full["message"]["tool_calls"][1]["function"]["arguments"].startswith(
        last["function"]["arguments"])


# ---- the conversation round trip ------------------------------------------------------------
def test_round_trip_through_the_template(hermes_server):
    """The call, the tool's answer in a tool message, then the final answer as text; the
    prompt holds the call and the answer in the template's own format."""
    r = chat(hermes_server, tool_choice={"type": "function", "function": {"name": "get_weather"}},
             temperature=0)
    call = r.json()["choices"][0]["message"]["tool_calls"][0]
    follow = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": call["id"], "content": "18 C, sunny"}]
    r = chat(hermes_server, messages=follow, tool_choice="none", max_tokens=5, temperature=0)
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert isinstance(message["content"], str) and "tool_calls" not in message
    http = hermes_server.http()
    ids = http.post("/tokenize", json={"messages": follow}).json()["tokens"]
    prompt = http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    arguments = json.loads(call["function"]["arguments"])
    assert ('<tool_call>\n{"name": "get_weather", "arguments": '
            f'{json.dumps(arguments)}}}\n</tool_call>') in prompt
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in prompt


# ---- refusals: a 400 naming the field -------------------------------------------------------
@pytest.mark.parametrize("body, param, words", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not in tools"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": 3}}}}}]},
     "tools", "not a valid JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "string"}}}]}, "tools", "must describe an object"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools",
     "function name"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools", "second function named"),
    ({"tools": [{"type": "retrieval"}]}, "tools", ""),
    ({"tool_choice": "sometimes"}, "tool_choice", ""),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "constrains the reply"),
    ({"messages": ASK + [{"role": "tool", "content": "x"}]}, "messages", "tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages", "only assistant messages"),
])
def test_bad_tool_requests_are_400s(hermes_server, body, param, words):
    r = chat(hermes_server, tool_choice="required", **body) if "tool_choice" not in body \
        else chat(hermes_server, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_auto_needs_the_server_flags(default_server):
    r = chat(default_server)                 # tools without tool_choice: "auto"
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "tool_choice" and "--enable-auto-tool-choice" in error["message"]
    r = chat(default_server, tool_choice="none", max_tokens=3)
    assert r.status_code == 200 and "tool_calls" not in r.json()["choices"][0]["message"]
    # tool_choice "none" without tools is harmless (clients send it by default).
    r = default_server.http().post("/v1/chat/completions", json={
        "messages": ASK, "tool_choice": "none", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_the_model_name_is_served(hermes_server):
    assert chat(hermes_server, tool_choice="required", model=MODEL_NAME).status_code == 200
