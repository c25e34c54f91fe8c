"""Tool calling at the API edge: a chat request's ``tools`` and ``tool_choice`` → a
``ToolPlan``: what the chat template gets, what grammar (if any) constrains the reply, and
which parser turns the generated text into ``message.tool_calls``.

What each ``tool_choice`` guarantees (as vLLM does it):

- ``"none"``: the tools are in the prompt; the reply is text, never parsed.
- ``"auto"`` (the default when tools are given): the model decides; the server's
  ``--tool-call-parser`` reads calls from the text (``server/tool_parsers.py``), and text that
  does not parse stays content. Needs ``--enable-auto-tool-choice``, else a 400.
- ``"required"``: the reply is constrained by a grammar to a JSON array of one or more calls
  (one when ``parallel_tool_calls`` is false), each ``{"name": a declared function,
  "arguments": an object valid against its parameters}``, whatever the model.
- a named function: the reply is constrained to that function's arguments object.

``finish_reason`` is ``"tool_calls"`` when the reply made calls (``auto`` and ``required``),
``"stop"`` for a named function (OpenAI's rule: the caller chose the call), and
``"length"`` whenever ``max_tokens`` cut the reply, whose last call then has the arguments as
far as they got (as OpenAI returns them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from itt_runtime.sampling.structured_output import GrammarSpec
from server.errors import bad_request
from server.protocol import ChatCompletionRequest, NamedToolChoice
from server.tool_parsers import PARSERS, ToolCallParser, named, required

# OpenAI's rule for function names.
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
MAX_NAME = 64
MAX_TOOLS = 128
NO_PARAMETERS = {"type": "object", "properties": {}}

Choice = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True)
class ToolPlan:
    choice: Choice
    tools: list[dict[str, Any]]         # as the chat template gets them
    names: tuple[str, ...]
    parallel: bool
    function: str | None = None         # the named function
    parser: str | None = None           # "auto": the server's --tool-call-parser
    grammar: GrammarSpec | None = None  # "required" and named: what the reply must be

    def new_parser(self) -> ToolCallParser | None:
        """A fresh parser for one choice's reply; None where the reply is plain text."""
        if self.choice == "auto":
            assert self.parser is not None
            return PARSERS[self.parser](self.names, self.parallel)
        if self.choice == "required":
            return required(self.names, self.parallel)
        if self.choice == "named":
            assert self.function is not None
            return named(self.function)
        return None


def plan(req: ChatCompletionRequest, auto_parser: str | None) -> ToolPlan | None:
    """The request's tool plan (None without tools); a 400 naming the field for tools that
    are malformed, a ``tool_choice`` that names no declared tool or comes without tools, and
    ``"auto"`` on a server without a parser. ``auto_parser``: the server's parser when started
    with ``--enable-auto-tool-choice``."""
    choice = req.tool_choice
    if not req.tools:
        if choice is not None and choice != "none":
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    if len(req.tools) > MAX_TOOLS:
        raise bad_request(f"at most {MAX_TOOLS} tools are allowed, got {len(req.tools)}",
                          "tools")
    definitions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(req.tools):
        f = tool.function
        _check_name(f.name, f"tools[{i}].function.name")
        if f.name in definitions:
            raise bad_request(f"tools[{i}]: a second function named {f.name!r}", "tools")
        parameters = NO_PARAMETERS if f.parameters is None else f.parameters
        _check_schema(parameters, f"tools[{i}].function.parameters")
        definitions[f.name] = {k: v for k, v in (
            ("name", f.name), ("description", f.description), ("parameters", parameters))
            if v is not None}
    tools = [{"type": "function", "function": d} for d in definitions.values()]
    names = tuple(definitions)
    parallel = req.parallel_tool_calls
    if choice is None:
        choice = "auto"             # OpenAI's default when tools are given
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in definitions:
            raise bad_request(f"tool_choice names function {name!r}, which is not in tools "
                              f"({', '.join(names)})", "tool_choice")
        return ToolPlan("named", tools, names, parallel, function=name,
                        grammar=_schema_spec(definitions[name]["parameters"]))
    if choice == "required":
        return ToolPlan("required", tools, names, parallel,
                        grammar=_schema_spec(calls_schema(definitions, parallel)))
    if choice == "auto":
        if auto_parser is None:
            raise bad_request('"auto" tool choice (the default with tools) needs the server '
                              "started with --enable-auto-tool-choice and --tool-call-parser; "
                              'use tool_choice "required", a named function, or "none"',
                              "tool_choice")
        return ToolPlan("auto", tools, names, parallel, parser=auto_parser)
    return ToolPlan("none", tools, names, parallel)


def calls_schema(definitions: dict[str, dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON schema of a ``"required"`` reply: an array of calls to declared functions."""
    calls = [{"type": "object",
              "properties": {"name": {"const": name}, "arguments": d["parameters"]},
              "required": ["name", "arguments"], "additionalProperties": False}
             for name, d in definitions.items()]
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def _schema_spec(schema: dict[str, Any]) -> GrammarSpec:
    return GrammarSpec("json_schema", json.dumps(schema))


def _check_name(name: str, where: str) -> None:
    if not 1 <= len(name) <= MAX_NAME or not set(name) <= NAME_CHARS:
        raise bad_request(f"{where}: a function name is 1 to {MAX_NAME} characters a-z, A-Z, "
                          f"0-9, _ or -; got {name!r}", "tools")


def _check_schema(schema: Any, where: str) -> None:
    """A 400 unless ``schema`` is a valid JSON schema of an object (arguments are one)."""
    import jsonschema
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise bad_request(f"{where}: not a valid JSON schema: {e.message}", "tools") from None
    if schema.get("type", "object") != "object":
        raise bad_request(f"{where}: the parameters schema must describe an object (type "
                          f"'object'), got type {schema.get('type')!r}", "tools")
