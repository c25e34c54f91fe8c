"""Tool calling through real clients against the real server (the tiny model, a Hermes
template that takes ``tools``, ``--enable-auto-tool-choice --tool-call-parser hermes``): the
full round trip (call → tool message → final answer) through the openai SDK and through
LangChain's ``bind_tools``; the SDK's stream helper and LangChain's ``stream`` reassemble the
same calls as the whole response; ``client.chat.completions.parse`` with
``openai.pydantic_function_tool`` and LangChain's ``with_structured_output(method=
"function_calling")`` parse the forced call into the Pydantic model."""

from __future__ import annotations

import json
from functools import reduce
from typing import Literal

import openai
import pytest
from live_server import MODEL_NAME
from pydantic import BaseModel, Field

langchain_openai = pytest.importorskip(
    "langchain_openai", reason="the clients extra: pip install -e '.[clients]'")
from langchain_core.messages import HumanMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class GetWeather(BaseModel):
    """The weather in a city, now."""
    city: Literal["Paris", "Rome", "Oslo"]
    unit: Literal["C", "F"] = "C"


@tool
def get_weather(city: Literal["Paris", "Rome", "Oslo"]) -> str:
    """The weather in a city, now."""
    return f"18 C in {city}"


@tool
def add(a: int = Field(ge=-9, le=9), b: int = Field(ge=-9, le=9)) -> int:
    """Add two small integers."""
    return a + b


WEATHER_TOOL = openai.pydantic_function_tool(GetWeather, name="get_weather")


@pytest.fixture(scope="module")
def client(tools_server) -> openai.OpenAI:
    return tools_server.client(timeout=60)


def create(client, **kw):
    kw = {"model": MODEL_NAME, "messages": ASK, "tools": [WEATHER_TOOL], "temperature": 0,
          "max_tokens": 200, **kw}
    return client.chat.completions.create(**kw)


# ---- openai SDK -----------------------------------------------------------------------------
def test_sdk_round_trip(client):
    first = create(client, tool_choice="required")
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and message.content is None
    [call] = message.tool_calls[:1]
    args = GetWeather.model_validate_json(call.function.arguments)
    follow = ASK + [message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": f"18 C in {args.city}"}]
    final = create(client, messages=follow, tool_choice="none", max_tokens=6)
    assert isinstance(final.choices[0].message.content, str)
    assert not final.choices[0].message.tool_calls
    assert final.usage.prompt_tokens > first.usage.prompt_tokens   # the call and its answer


def test_sdk_parse_with_a_pydantic_tool(client):
    """``parse`` needs strict tools and parses each call's arguments into the model."""
    done = client.chat.completions.parse(
        model=MODEL_NAME, messages=ASK, tools=[WEATHER_TOOL], temperature=0, max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    [call] = done.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, GetWeather)


@pytest.mark.parametrize("tool_choice", ["required",
                                         {"type": "function", "function": {"name": "get_weather"}}])
def test_sdk_stream_helper_reassembles_the_calls(client, tool_choice):
    for seed in range(3):
        kw = {"model": MODEL_NAME, "messages": ASK, "tools": [WEATHER_TOOL],
              "temperature": 1.0, "seed": seed, "max_tokens": 200, "tool_choice": tool_choice}
        whole = client.chat.completions.create(**kw).choices[0]
        with client.chat.completions.stream(**kw) as stream:
            streamed = stream.get_final_completion().choices[0]
        assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] \
            == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
        assert streamed.finish_reason == whole.finish_reason


# ---- LangChain ------------------------------------------------------------------------------
def chat_model(server, **kw):
    kw = {"temperature": 0, "max_tokens": 200, **kw}
    return langchain_openai.ChatOpenAI(model=MODEL_NAME, base_url=f"{server.url}/v1",
                                       api_key="unused", max_retries=0, timeout=60, **kw)


def test_langchain_bind_tools_round_trip(tools_server):
    model = chat_model(tools_server)
    tools = {"get_weather": get_weather, "add": add}
    messages = [HumanMessage("What is the weather in Paris?")]
    reply = model.bind_tools(list(tools.values()), tool_choice="any").invoke(messages)
    assert reply.tool_calls and not reply.invalid_tool_calls
    for call in reply.tool_calls:
        assert call["name"] in tools
        messages_out = tools[call["name"]].invoke(call["args"])   # validates the arguments
        assert messages_out is not None
    messages += [reply] + [ToolMessage(str(tools[c["name"]].invoke(c["args"])),
                                       tool_call_id=c["id"]) for c in reply.tool_calls]
    final = model.bind_tools(list(tools.values()), tool_choice="none").invoke(messages)
    assert isinstance(final.content, str) and not final.tool_calls
    assert final.response_metadata["finish_reason"] in ("stop", "length")


def test_langchain_named_tool_and_stream(tools_server):
    model = chat_model(tools_server, temperature=1.0, seed=3).bind_tools(
        [get_weather, add], tool_choice="add")
    messages = [HumanMessage("Add two and three.")]
    whole = model.invoke(messages)
    [call] = whole.tool_calls
    assert call["name"] == "add" and set(call["args"]) == {"a", "b"}
    chunks = list(model.stream(messages))
    assert sum(1 for c in chunks if c.tool_call_chunks) > 1            # it did stream
    total = reduce(lambda a, b: a + b, chunks)
    assert [(c["name"], c["args"]) for c in total.tool_calls] == [(call["name"], call["args"])]


def test_langchain_structured_output_function_calling(tools_server):
    structured = chat_model(tools_server).with_structured_output(
        GetWeather, method="function_calling")
    result = structured.invoke("Weather in Oslo?")
    assert isinstance(result, GetWeather)
    json.dumps(result.model_dump())
