"""The prefix-caching workloads without a server: shared-prefix prompts, multi-turn
conversations (each turn's prompt extends the previous one by its answer and a new message),
the conversation loop against a mock transport, and cached tokens in the summary."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from tqdm import tqdm

from loadtest.client import OpenAIClient
from loadtest.metrics import summarize
from loadtest.report import render_table
from loadtest.run import LoadConfig, conversations_loop
from loadtest.workload import (
    BudgetMix,
    Conversation,
    LengthDist,
    conversation_stream,
    request_stream,
    shared_prefix,
)

FIXED = (LengthDist.parse("5"), LengthDist.parse("3"), BudgetMix.parse("0,1"))


def test_shared_prefix_prompts():
    prefix = shared_prefix(384, seed=7)
    assert len(prefix.split()) == 384
    assert shared_prefix(384, seed=7) == prefix != shared_prefix(384, seed=8)
    assert shared_prefix(0, seed=7) == ""
    specs = list(request_stream(*FIXED, seed=1, limit=20, prefix=prefix))
    assert all(s.prompt.startswith(prefix + " ") for s in specs)
    suffixes = [s.prompt[len(prefix) + 1:] for s in specs]
    assert all(len(x.split()) == 5 for x in suffixes) and len(set(suffixes)) == 20
    # The prefix changes nothing else: lengths, budgets, suffixes are those of the plain stream.
    plain = list(request_stream(*FIXED, seed=1, limit=20))
    assert [s.prompt for s in plain] == suffixes
    assert [(s.max_tokens, s.think_budget) for s in plain] == \
        [(s.max_tokens, s.think_budget) for s in specs]


def test_conversation_turns_extend_the_history():
    conv = next(conversation_stream(3, *FIXED, seed=2, prefix="SYSTEM"))
    assert conv.turns == 3 and len({*conv.user_messages}) == 3
    first = conv.turn(0, 10)
    assert first.index == 10 and first.max_tokens == 3
    assert first.prompt == f"SYSTEM\n\nUser: {conv.user_messages[0]}\nAssistant:"
    assert first.messages == ({"role": "system", "content": "SYSTEM"},
                              {"role": "user", "content": conv.user_messages[0]})
    with pytest.raises(ValueError):
        conv.turn(1, 11)                                  # needs the first answer
    conv.answers.append(" the answer")
    second = conv.turn(1, 11)
    assert second.prompt == (first.prompt + " the answer\nUser: "
                             + conv.user_messages[1] + "\nAssistant:")
    assert second.messages is not None and second.messages[2:] == (
        {"role": "assistant", "content": "the answer"},
        {"role": "user", "content": conv.user_messages[1]})
    assert second.stop == ("\nUser:",) and second.think_budget == conv.think_budget


def test_conversation_stream_is_deterministic():
    a = list(conversation_stream(4, *FIXED, seed=3, limit=5))
    b = list(conversation_stream(4, *FIXED, seed=3, limit=5))
    assert a == b and len(a) == 5 and not a[0].system
    with pytest.raises(ValueError):
        next(conversation_stream(0, *FIXED, seed=3))


def test_multi_turn_needs_a_closed_loop():
    with pytest.raises(ValueError):
        LoadConfig(rate=(1.0,), multi_turn=3)
    with pytest.raises(ValueError):
        LoadConfig(shared_prefix_len=-1)


def test_conversation_loop_sends_each_answer_back():
    sent: list[dict] = []

    def handler(request):
        body = json.loads(request.content)
        sent.append(body)
        turn = len([m for m in body["messages"] if m["role"] == "user"])
        return httpx.Response(200, json={
            "choices": [{"message": {"content": f"answer {turn}"}, "thinking": [0]}],
            "usage": {"prompt_tokens": 10 * turn, "completion_tokens": 1,
                      "prompt_tokens_details": {"cached_tokens": 8 * (turn - 1)}}})

    async def go():
        client = OpenAIClient("http://test", "m", "chat", stream=False,
                              transport=httpx.MockTransport(handler))
        convs = conversation_stream(3, *FIXED, seed=4, limit=2)
        try:
            return await conversations_loop(client, convs, 2, 5, None,
                                            tqdm(disable=True))
        finally:
            await client.aclose()

    results = asyncio.run(go())
    assert len(results) == len(sent) == 5            # the request bound cuts the last turn
    assert sorted(r.index for r in results) == [0, 1, 2, 3, 4]
    third = [b for b in sent if len(b["messages"]) == 5]
    assert third and [m["content"] for m in third[0]["messages"] if m["role"] == "assistant"] \
        == ["answer 1", "answer 2"]
    summary = summarize(results, 1.0)
    assert summary["total_input_tokens"] == 10 + 20 + 30 + 10 + 20
    assert summary["total_cached_tokens"] == 0 + 8 + 16 + 0 + 8
    assert summary["cached_fraction"] == pytest.approx(32 / 90)
    table = render_table({"r": {"runs": [{"label": "c=2", **summary}]}})
    assert "prompt tokens cached" in table and "prompt tokens sent" in table


def test_completions_turns_stop_at_the_next_user_turn():
    conv = Conversation(0, ["hi", "more"], [4, 4], None)
    client = OpenAIClient("http://test", "m", "completions")
    body = client.payload(conv.turn(0, 0))
    assert body["prompt"] == "User: hi\nAssistant:" and body["stop"] == ["\nUser:"]
    assert "messages" not in body
