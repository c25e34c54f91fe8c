"""The tool-call parsers on hand-written model outputs: each case's content, calls and
failures, and the same result however the text is split into streamed pieces."""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Callable

import pytest

from server.tool_parsers import (
    PARSERS,
    ToolCall,
    ToolCallDelta,
    ToolCallParser,
    hermes,
    llama3_json,
    named,
    new_call_id,
    parse_all,
    required,
)

TOOLS = ("get_weather", "search")

# Arguments with every character that could fool a brace count: braces and brackets in strings,
# escaped quotes, a string ending in a backslash, the closing tag, and a \u escape.
TRICKY = (r'{"q": "a}b{c\"d</tool_call>\\", "n": {"m": [1, {"k": "\\\""}]}, '
          r'"e": "\u00e9 ]"}')


def counting_ids() -> Callable[[], str]:
    """Deterministic call ids: call_0, call_1, ... for each new parser."""
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


MAKERS: dict[str, Callable[[], ToolCallParser]] = {
    "hermes": lambda: hermes(TOOLS, new_id=counting_ids()),
    "hermes_one": lambda: hermes(TOOLS, parallel=False, new_id=counting_ids()),
    "llama3": lambda: llama3_json(TOOLS, new_id=counting_ids()),
    "llama3_one": lambda: llama3_json(TOOLS, parallel=False, new_id=counting_ids()),
    "required": lambda: required(TOOLS, new_id=counting_ids()),
    "required_one": lambda: required(TOOLS, parallel=False, new_id=counting_ids()),
    "named": lambda: named("get_weather", new_id=counting_ids()),
}

# name: (parser, model output, content, [(tool, arguments)], failures)
CASES: dict[str, tuple[str, str, str, list[tuple[str, str]], int]] = {
    # hermes: well formed
    "hermes_content_only": (
        "hermes", "Hello there.\n\nHow can I help?  \n",
        "Hello there.\n\nHow can I help?  \n", [], 0),
    "hermes_one_call": (
        "hermes",
        'I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '</tool_call>\n',
        "I will check.", [("get_weather", '{"city": "Paris"}')], 0),
    "hermes_parallel": (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "search", "arguments": {"q": "news"}}\n</tool_call>',
        "", [("get_weather", '{"city": "Paris"}'), ("search", '{"q": "news"}')], 0),
    "hermes_content_between_and_after": (
        "hermes",
        'First:\n<tool_call>\n{"name": "search", "arguments": {"q": "a"}}\n</tool_call>\n'
        'then, \n<tool_call>{"name": "search", "arguments": {"q": "b"}}</tool_call>\n\n'
        'Done. \n',
        "First:then,Done.", [("search", '{"q": "a"}'), ("search", '{"q": "b"}')], 0),
    "hermes_reversed_keys": (
        "hermes",
        '<tool_call>\n{"arguments": {"q": "x", "page": 2}, "name": "search"}\n</tool_call>',
        "", [("search", '{"q": "x", "page": 2}')], 0),
    "hermes_other_keys": (
        "hermes",
        '<tool_call>{"id": -7.5e1, "type": "function", "name": "search", '
        '"meta": [1, {"a": "}]"}], "arguments": {"q": "y"}, "done": true}</tool_call>',
        "", [("search", '{"q": "y"}')], 0),
    "hermes_tricky_strings": (
        "hermes", '<tool_call>\n{"name": "search", "arguments": ' + TRICKY + '}\n</tool_call>ok',
        "ok", [("search", TRICKY)], 0),
    "hermes_unicode": (
        "hermes",
        'Voilà 🙂\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich ☃ 東京"}}'
        '\n</tool_call>',
        "Voilà 🙂", [("get_weather", '{"city": "Zürich ☃ 東京"}')], 0),
    "hermes_escaped_name": (
        "hermes", '<tool_call>{"name": "sea\\u0072ch", "arguments": {}}</tool_call>',
        "", [("search", "{}")], 0),
    "hermes_no_closing_tag": (
        "hermes", '<tool_call>\n{"name": "search", "arguments": {"q": "z"}}\n',
        "", [("search", '{"q": "z"}')], 0),
    "hermes_no_closing_tag_then_content": (
        "hermes", '<tool_call>\n{"name": "search", "arguments": {"q": "z"}}\nAnything else?',
        "Anything else?", [("search", '{"q": "z"}')], 0),
    "hermes_cut_after_header": (
        "hermes", 'Checking <tool_call>\n{"name": "search", "arguments": {"q": "Par',
        "Checking", [("search", '{"q": "Par')], 0),
    "hermes_cut_after_arguments": (
        "hermes", '<tool_call>\n{"name": "search", "arguments": {"q": "P"}, "x',
        "", [("search", '{"q": "P"}')], 0),
    "hermes_cut_in_closing_tag": (
        "hermes", '<tool_call>\n{"name": "search", "arguments": {}}\n</tool_',
        "", [("search", "{}")], 0),
    # hermes: malformed
    "hermes_not_json": (
        "hermes", "Hi <tool_call>\nnot json\n</tool_call> bye",
        "Hi <tool_call>\nnot json\n</tool_call> bye", [], 1),
    "hermes_unknown_name": (
        "hermes", '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>\n',
        '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>\n', [], 1),
    "hermes_arguments_a_string": (
        "hermes", '<tool_call>\n{"name": "search", "arguments": "{\\"q\\": 1}"}\n</tool_call>',
        '<tool_call>\n{"name": "search", "arguments": "{\\"q\\": 1}"}\n</tool_call>', [], 1),
    "hermes_no_arguments": (
        "hermes", '<tool_call>{"name": "search"}</tool_call>',
        '<tool_call>{"name": "search"}</tool_call>', [], 1),
    "hermes_arguments_first_unknown_name": (
        "hermes", '<tool_call>{"arguments": {"q": "}"}, "name": "nope"}</tool_call>',
        '<tool_call>{"arguments": {"q": "}"}, "name": "nope"}</tool_call>', [], 1),
    "hermes_bad_literal": (
        "hermes", '<tool_call>{"id": tru, "name": "search", "arguments": {}}</tool_call>',
        '<tool_call>{"id": tru, "name": "search", "arguments": {}}</tool_call>', [], 1),
    "hermes_cut_before_header": (
        "hermes", 'Checking <tool_call>\n{"name": "sea',
        'Checking <tool_call>\n{"name": "sea', [], 1),
    "hermes_tag_start_at_end": (
        "hermes", "Let me see <tool_c", "Let me see <tool_c", [], 0),
    "hermes_not_a_tag": (
        "hermes", "x < y, <tool> and <tool_callz>", "x < y, <tool> and <tool_callz>", [], 0),
    "hermes_empty_block_then_call": (
        "hermes",
        '<tool_call></tool_call>\n<tool_call>{"name": "search", "arguments": {}}</tool_call>',
        "<tool_call></tool_call>", [("search", "{}")], 1),
    "hermes_failed_then_call": (
        "hermes",
        '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"name": "search", "arguments": {"q": "a"}}\n</tool_call>',
        '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',
        [("search", '{"q": "a"}')], 1),
    "hermes_not_parallel": (
        "hermes_one",
        'Sure.\n<tool_call>\n{"name": "search", "arguments": {"q": "a"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "b"}}\n</tool_call>\n'
        '<tool_call>\nnot json\n</tool_call>\nDone.',
        "Sure.Done.", [("search", '{"q": "a"}')], 0),
    # llama3_json
    "llama3_one_call": (
        "llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        "", [("get_weather", '{"city": "Paris"}')], 0),
    "llama3_python_tag_and_arguments_key": (
        "llama3", ' <|python_tag|>{"name": "search", "arguments": {"q": "x"}}',
        "", [("search", '{"q": "x"}')], 0),
    "llama3_parallel": (
        "llama3",
        '{"name": "search", "parameters": {"q": "a"}}; '
        '{"parameters": {"city": "b"}, "name": "get_weather"}',
        "", [("search", '{"q": "a"}'), ("get_weather", '{"city": "b"}')], 0),
    "llama3_newline_separated": (
        "llama3",
        ' \n{"name": "search", "parameters": {"q": "a"}}\n'
        '{"name": "search", "parameters": {"q": "b"}}\n',
        "", [("search", '{"q": "a"}'), ("search", '{"q": "b"}')], 0),
    "llama3_calls_then_content": (
        "llama3", '{"name": "search", "parameters": {"q": "a"}}\nThat is all. ',
        "That is all.", [("search", '{"q": "a"}')], 0),
    "llama3_tricky_strings": (
        "llama3", '{"name": "search", "parameters": ' + TRICKY + '}',
        "", [("search", TRICKY)], 0),
    "llama3_plain_text": (
        "llama3", 'The weather in Paris is {"mild": true}.\n',
        'The weather in Paris is {"mild": true}.\n', [], 0),
    "llama3_plain_text_after_space": (
        "llama3", "  \n<|python Sure.", "  \n<|python Sure.", [], 0),
    "llama3_python_tag_then_text": (
        "llama3", "<|python_tag|>print(1)", "<|python_tag|>print(1)", [], 0),
    "llama3_only_space": ("llama3", " \n ", " \n ", [], 0),
    "llama3_json_not_a_call": (
        "llama3", '{"a": 1} is JSON', '{"a": 1} is JSON', [], 1),
    "llama3_unknown_name": (
        "llama3", '{"name": "nope", "parameters": {}}', '{"name": "nope", "parameters": {}}',
        [], 1),
    "llama3_second_fails": (
        "llama3",
        '{"name": "search", "parameters": {"q": "a"}}; {"name": "nope", "parameters": {}}',
        '; {"name": "nope", "parameters": {}}', [("search", '{"q": "a"}')], 1),
    "llama3_cut_before_header": (
        "llama3", '<|python_tag|>{"name": "se', '<|python_tag|>{"name": "se', [], 1),
    "llama3_cut_after_header": (
        "llama3", '{"name": "search", "parameters": {"q": "a', "", [("search", '{"q": "a')], 0),
    "llama3_trailing_separator": (
        "llama3", '{"name": "search", "parameters": {}};', "", [("search", "{}")], 0),
    "llama3_not_parallel": (
        "llama3_one",
        '{"name": "search", "parameters": {"q": "a"}}; '
        '{"name": "search", "parameters": {"q": "b"}}; {"name": "nope", "parameters": {}}',
        "", [("search", '{"q": "a"}')], 0),
    # required
    "required_two": (
        "required",
        '[{"name": "search", "arguments": {"q": "a"}}, '
        '{"name": "get_weather", "arguments": {"city": "b"}}]',
        "", [("search", '{"q": "a"}'), ("get_weather", '{"city": "b"}')], 0),
    "required_spaced": (
        "required", ' [\n  {"arguments": ' + TRICKY + ', "name": "search"}\n]\n',
        "", [("search", TRICKY)], 0),
    "required_cut_in_arguments": (
        "required", '[{"name": "search", "arguments": {"q": "a', "", [("search", '{"q": "a')], 0),
    "required_cut_before_second_header": (
        "required", '[{"name": "search", "arguments": {"q": "a"}}, {"name": "get_w',
        "", [("search", '{"q": "a"}')], 1),
    "required_unknown_name": (
        "required", '[{"name": "nope", "arguments": {}}]', "", [], 1),
    "required_not_an_array": ("required", 'Sure: [{"name"', "", [], 1),
    "required_not_parallel": (
        "required_one",
        '[{"name": "search", "arguments": {"q": "a"}}, {"name": "search", "arguments": {}}]',
        "", [("search", '{"q": "a"}')], 0),
    # named
    "named": ("named", '{"city": "Zürich", "days": [1, 2]}', "",
              [("get_weather", '{"city": "Zürich", "days": [1, 2]}')], 0),
    "named_nothing_generated": ("named", "", "", [("get_weather", "")], 0),
}


def stream(kind: str, pieces: list[str]) -> tuple[str, list[ToolCall], int]:
    """Feeds ``pieces`` one by one, then finishes, and rebuilds the content and the calls from
    the deltas alone, checking the deltas' shape on the way."""
    parser = MAKERS[kind]()
    content, deltas = "", []
    for piece in pieces:
        text, new = parser.feed(piece)
        content, deltas = content + text, deltas + new
    text, new = parser.finish()
    content, deltas = content + text, deltas + new
    calls: list[ToolCall] = []
    for delta in deltas:
        if delta.index == len(calls):       # a new call: its header comes first, alone
            assert delta.id is not None and delta.name is not None and delta.arguments == ""
            calls.append(ToolCall(delta.id, delta.name, ""))
        else:
            assert delta.index == len(calls) - 1, "deltas belong to the latest call"
            assert delta.id is None and delta.name is None and delta.arguments
            calls[-1].arguments += delta.arguments
    assert calls == parser.calls
    return content, calls, parser.failures


@pytest.mark.parametrize("case", CASES)
def test_parse_all(case):
    kind, text, content, calls, failures = CASES[case]
    parser = MAKERS[kind]()
    assert parse_all(parser, text) == (content, [ToolCall(f"call_{i}", name, args)
                                                 for i, (name, args) in enumerate(calls)])
    assert parser.failures == failures


@pytest.mark.parametrize("case", CASES)
def test_every_split_gives_the_same_result(case):
    kind, text, *_ = CASES[case]
    parser = MAKERS[kind]()
    whole = parse_all(parser, text) + (parser.failures,)
    for cut in range(len(text) + 1):
        assert stream(kind, [text[:cut], text[cut:]]) == whole, f"split at {cut}"
    assert stream(kind, list(text)) == whole, "one character at a time"


# Pieces of model output that meet at awkward places when strung together at random.
FRAGMENTS = ['<tool_call>', '</tool_call>', '<tool_', '<|python_tag|>', '{', '}', '[', ']', ':',
             ',', ';', '"', '\\', ' ', '\n', 'x', 'é', '1', 'true', '"name"', '"search"',
             '"nope"', '"arguments"', '"parameters"', '{"name": "search", "arguments": {', '"}']


def test_random_text_streams_as_it_parses():
    """Random strings of fragments: any split gives parse_all's result, and a reply with no
    call is its own text exactly."""
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 12)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(3, len(text) + 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        for kind in MAKERS:
            parser = MAKERS[kind]()
            whole = parse_all(parser, text) + (parser.failures,)
            assert stream(kind, pieces) == whole, (kind, pieces)
            assert stream(kind, list(text)) == whole, (kind, text)
            if kind.startswith(("hermes", "llama3")) and not whole[1]:
                assert whole[0] == text, (kind, text)


def test_the_cases_are_honest():
    """A case's completed arguments are valid JSON, and TRICKY holds what it claims."""
    for *_, calls, _ in CASES.values():
        for _, args in calls:
            if args.endswith("}"):
                json.loads(args)
    assert json.loads(TRICKY) == {"q": 'a}b{c"d</tool_call>\\', "n": {"m": [1, {"k": '\\"'}]},
                                  "e": "é ]"}


def test_hermes_streams_as_soon_as_decided():
    parser = MAKERS["hermes"]()
    assert parser.feed("Hello <tool_c") == ("Hello", [])
    assert parser.feed('all>\n{"name": "search", "arguments": {"q": "pa') == (
        "", [ToolCallDelta(0, "call_0", "search"), ToolCallDelta(0, arguments='{"q": "pa')])
    assert parser.feed('ris"}}\n</tool_call>') == ("", [ToolCallDelta(0, arguments='ris"}')])
    assert parser.finish() == ("", [])


def test_whitespace_is_held_until_content_follows():
    parser = MAKERS["hermes"]()
    assert parser.feed("Hi \n") == ("Hi", [])
    assert parser.feed("there") == (" \nthere", [])
    assert parser.finish() == ("", [])


def test_arguments_before_the_name_wait_for_it():
    parser = MAKERS["llama3"]()
    assert parser.feed('{"arguments": {"q": 1}') == ("", [])
    assert parser.feed(', "name": "search"}') == (
        "", [ToolCallDelta(0, "call_0", "search"), ToolCallDelta(0, arguments='{"q": 1}')])


def test_named_sends_its_header_first():
    parser = named("f", new_id=counting_ids())
    assert parser.feed('{"a"') == (
        "", [ToolCallDelta(0, "call_0", "f"), ToolCallDelta(0, arguments='{"a"')])
    assert parser.feed(": 1}") == ("", [ToolCallDelta(0, arguments=": 1}")])
    assert parser.finish() == ("", [])


def test_call_ids_are_openai_shaped_and_unique():
    ids = {new_call_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)
    call = parse_all(hermes(TOOLS), '{"name": "search", "arguments": {}}'.join(
        ["<tool_call>", "</tool_call>"]))[1][0]
    assert re.fullmatch(r"call_[0-9a-f]{24}", call.id)


def test_parser_names():
    assert set(PARSERS) == {"hermes", "llama3_json"}
