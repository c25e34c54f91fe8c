"""LangChain's ``ChatOpenAI`` (langchain-openai) against the real server, each result
compared with the same request made through the openai SDK: ``invoke`` (reply, finish reason,
token usage), ``stream`` (the chunks add up to the invoked reply and its usage) and
``with_structured_output(PydanticModel, method="json_schema")``. Tool calling
(``bind_tools``) is in test_tool_calling_clients.py."""

from __future__ import annotations

from functools import reduce
from typing import Literal

import pytest
from live_server import MODEL_NAME
from pydantic import BaseModel, Field

langchain_openai = pytest.importorskip(
    "langchain_openai", reason="the clients extra: pip install -e '.[clients]'")

SYSTEM, USER = "Short answers.", "Describe a pet."
MAX_TOKENS = 8


class Pet(BaseModel):
    """Bounded fields, so that even a random model's answer ends well within max_tokens."""
    name: str = Field(max_length=8)
    kind: Literal["cat", "dog", "bird"]
    legs: int = Field(ge=0, le=4)


def chat_model(server, **kw):
    kw = {"temperature": 0, "max_tokens": MAX_TOKENS, **kw}
    return langchain_openai.ChatOpenAI(model=MODEL_NAME, base_url=f"{server.url}/v1",
                                       api_key="unused", max_retries=0, timeout=60, **kw)


def sdk_chat(server, **kw):
    """The same request through the openai SDK."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    return server.client(timeout=60).chat.completions.create(
        model=MODEL_NAME, messages=messages, temperature=0, max_tokens=MAX_TOKENS, **kw)


def test_invoke_equals_the_sdk(client_server):
    reply = chat_model(client_server).invoke([("system", SYSTEM), ("human", USER)])
    want = sdk_chat(client_server)
    assert want.choices[0].message.content                 # not vacuous
    assert reply.content == want.choices[0].message.content
    assert reply.response_metadata["finish_reason"] == want.choices[0].finish_reason
    assert reply.usage_metadata is not None
    assert (reply.usage_metadata["input_tokens"], reply.usage_metadata["output_tokens"]) \
        == (want.usage.prompt_tokens, want.usage.completion_tokens)


def test_stream_adds_up_to_invoke(client_server):
    model = chat_model(client_server, stream_usage=True)
    messages = [("system", SYSTEM), ("human", USER)]
    whole = model.invoke(messages)
    chunks = list(model.stream(messages))
    assert sum(1 for c in chunks if c.content) > 1          # it did stream
    total = reduce(lambda a, b: a + b, chunks)
    assert total.content == whole.content
    assert total.usage_metadata == whole.usage_metadata
    assert total.response_metadata["finish_reason"] == "length"


def test_with_structured_output_json_schema(client_server):
    structured = chat_model(client_server, max_tokens=60).with_structured_output(
        Pet, method="json_schema", include_raw=True)
    out = structured.invoke([("system", SYSTEM), ("human", USER)])
    assert out["parsing_error"] is None
    assert isinstance(out["parsed"], Pet)
    assert out["parsed"] == Pet.model_validate_json(out["raw"].content)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    want = client_server.client(timeout=60).chat.completions.parse(
        model=MODEL_NAME, messages=messages, response_format=Pet, temperature=0,
        max_tokens=60)
    assert out["parsed"] == want.choices[0].message.parsed
