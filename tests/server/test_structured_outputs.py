"""Structured outputs through the real server with the shipped default model: sampled
(temperature 1) outputs for JSON schemas all parse and validate, regex and choice outputs
match, streaming works, grammars batch with plain requests without changing anyone's greedy
output, and a bad schema, regex or grammar is a 400 naming its field."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from live_server import launch

from itt_runtime.checkpoints import DEFAULT_MODEL_DIR

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")
pytestmark = pytest.mark.skipif(not DEFAULT_MODEL_DIR.is_dir(),
                                reason="the default model has not been trained yet")

NAME = {"type": "string", "minLength": 1, "maxLength": 16}
SCHEMAS = {
    "required": {"type": "object", "properties": {
        "name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": NAME}, "required": ["name", "age"], "additionalProperties": False},
    "nested_enum": {"type": "object", "properties": {
        "title": NAME,
        "author": {"type": "object", "properties": {"first": NAME, "last": NAME},
                   "required": ["first", "last"], "additionalProperties": False},
        "status": {"enum": ["draft", "published", "archived"]}},
        "required": ["title", "author", "status"], "additionalProperties": False},
    "array_bounded": {"type": "object", "properties": {
        "scores": {"type": "array", "items": {"type": "number", "minimum": -1,
                                              "maximum": 1},
                   "minItems": 1, "maxItems": 4},
        "tags": {"type": "array", "items": NAME, "maxItems": 3}},
        "required": ["scores", "tags"], "additionalProperties": False},
    "enum_bool": {"type": "object", "properties": {
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"}, "count": {"type": "integer", "minimum": 1,
                                             "maximum": 9}},
        "required": ["colour", "ok", "count"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = launch("default", tmp_path_factory.mktemp("structured"), served_name=None,
                 ready_timeout=180)
    yield srv
    srv.stop()


def schema_samples(server, name: str, total: int, n: int = 10) -> list[str]:
    """``total`` sampled outputs for schema ``name``: half through completions with OpenAI's
    response_format, half through chat with vLLM's guided_json."""
    schema, http, texts = SCHEMAS[name], server.http(), []
    for i in range(total // n):
        if i % 2 == 0:
            r = http.post("/v1/completions", json={
                "prompt": "A record in JSON:", "max_tokens": 200, "temperature": 1.0, "n": n,
                "seed": i, "response_format": {"type": "json_schema", "json_schema": {
                    "name": name, "schema": schema, "strict": True}}})
            assert r.status_code == 200, r.text
            choices = r.json()["choices"]
            texts += [c["text"] for c in choices]
        else:
            r = http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Give me a record."}],
                "max_tokens": 200, "temperature": 1.0, "n": n, "seed": i,
                "guided_json": schema})
            assert r.status_code == 200, r.text
            choices = r.json()["choices"]
            texts += [c["message"]["content"] for c in choices]
        assert all(c["finish_reason"] == "stop" for c in choices), choices
    return texts


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_sampled_json_validates(server, name):
    for text in schema_samples(server, name, 20):
        jsonschema.validate(json.loads(text), SCHEMAS[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_sampled_json_validates_100(server, name):
    for text in schema_samples(server, name, 100):
        jsonschema.validate(json.loads(text), SCHEMAS[name])


def no_free_whitespace(text: str) -> bool:
    """Whether JSON ``text`` (whole or cut short) has whitespace only inside strings and in
    the ", " and ": " separators."""
    outside = re.sub(r'"(?:[^"\\]|\\.)*("|$)', '""', text)
    return not re.search(r"\s", outside.replace(", ", ",").replace(": ", ":"))


def test_regex_choice_and_json_object(server):
    http = server.http()
    pattern = r"[A-Z][a-z]{2,8} [0-9]{1,3}"
    for body in ({"guided_regex": pattern}, {"structured_outputs": {"regex": pattern}}):
        r = http.post("/v1/completions", json={"prompt": "Name and number:", "n": 10,
                                               "max_tokens": 30, "temperature": 1.0, **body})
        assert r.status_code == 200, r.text
        for c in r.json()["choices"]:
            assert re.fullmatch(pattern, c["text"]), c["text"]
            assert c["finish_reason"] == "stop"
    choices = ["yes", "no", "maybe so"]
    for body in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        r = http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Is it?"}], "n": 10,
            "temperature": 1.0, **body})
        assert r.status_code == 200, r.text
        assert {c["message"]["content"] for c in r.json()["choices"]} <= set(choices)
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Some JSON please."}], "n": 5,
        "max_tokens": 200, "temperature": 1.0, "response_format": {"type": "json_object"}})
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        text = c["message"]["content"]
        assert text.startswith("{") and no_free_whitespace(text), text
        if c["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict)
    grammar = 'root ::= "The " ("cat" | "dog") " sat."'
    r = http.post("/v1/completions", json={"prompt": "Once", "guided_grammar": grammar,
                                           "temperature": 1.0, "n": 4})
    assert {c["text"] for c in r.json()["choices"]} <= {"The cat sat.", "The dog sat."}


def test_streaming_with_a_schema(server):
    client = server.client(timeout=120)
    stream = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "A book, please."}],
        max_tokens=200, temperature=1.0, seed=3, stream=True,
        response_format={"type": "json_schema", "json_schema": {
            "name": "book", "schema": SCHEMAS["nested_enum"], "strict": True}})
    text, finish = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), SCHEMAS["nested_enum"])


def test_openai_sdk_parse_with_a_pydantic_model(server):
    """What LangChain's with_structured_output and the SDK's parse() send: a strict
    json_schema generated from a Pydantic model."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        name: str = Field(max_length=12)
        kind: Literal["cat", "dog", "bird"]
        legs: int = Field(ge=0, le=4)

    client = server.client(timeout=120)
    r = client.chat.completions.parse(
        model="default", messages=[{"role": "user", "content": "Describe a pet."}],
        response_format=Pet, max_tokens=100, temperature=1.0, seed=1, n=4)
    for c in r.choices:
        assert c.finish_reason == "stop"
        assert isinstance(c.message.parsed, Pet)


def test_max_tokens_inside_the_structure_is_length(server):
    r = server.http().post("/v1/completions", json={
        "prompt": "A record:", "max_tokens": 4, "temperature": 0,
        "guided_json": SCHEMAS["required"]})
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_mixed_batch_greedy_equals_alone(server):
    http = server.http()
    bodies = [
        {"prompt": "In the beginning", "max_tokens": 40, "temperature": 0},
        {"prompt": "A record:", "max_tokens": 120, "temperature": 0,
         "guided_json": SCHEMAS["enum_bool"]},
        {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0,
         "think_budget": 1.0},
        {"prompt": "Name:", "max_tokens": 30, "temperature": 0,
         "guided_regex": r"[A-Z][a-z]{2,8} [0-9]{1,3}"},
        {"prompt": "The answer is", "max_tokens": 10, "temperature": 0,
         "guided_choice": ["yes", "no"], "think_budget": 0.0},
    ]

    def run(body):
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    alone = [run(b) for b in bodies]
    with ThreadPoolExecutor(len(bodies) * 2) as pool:
        together = list(pool.map(run, bodies * 2))
    assert together == alone * 2


@pytest.mark.parametrize("body, param", [
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_json": {"type": "object", "properties": {"a": {"type": 3}}}}, "guided_json"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_grammar": "root ::= missing_rule"}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "required": 5}}}}, "response_format"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"guided_regex": "a", "guided_decoding_backend": "outlines"},
     "guided_decoding_backend"),
    ({"guided_regex": "a+", "min_tokens": 2}, "min_tokens"),
])
def test_invalid_spec_is_400_naming_the_field(server, body, param):
    r = server.http().post("/v1/completions", json={"prompt": "x", "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
