"""Structured outputs at the API edge: a request's OpenAI ``response_format`` or vLLM
``structured_outputs`` / ``guided_*`` field → a ``GrammarSpec`` → a grammar compiled in a
worker thread (cached by spec), so the engine loop never waits for a compile: a request
waits for its own grammar, others do not. A spec that does not compile is a 400 naming the
field."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from itt_runtime.sampling.structured_output import (
    CompiledGrammar,
    GrammarCompiler,
    GrammarError,
    GrammarSpec,
)
from itt_runtime.tokenizers.tokenizer import Tokenizer
from server.errors import bad_request

BACKENDS = (None, "auto", "xgrammar")


def spec_of(req: Any) -> tuple[GrammarSpec, str] | None:
    """The request's grammar and the field that asked for it; None without one. 400 for a
    malformed form or more than one form in one request."""
    found: list[tuple[GrammarSpec, str]] = []
    rf = req.response_format
    if rf is not None and rf.type != "text":
        if rf.type == "json_object":
            found.append((GrammarSpec("json_object"), "response_format"))
        else:
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise bad_request("response_format type 'json_schema' needs "
                                  "json_schema.schema", "response_format")
            found.append((_schema(rf.json_schema.schema_, "response_format"),
                          "response_format"))
    so = req.structured_outputs
    if so is not None:
        forms = [(k, v) for k, v in (("json", so.json_), ("regex", so.regex),
                                     ("choice", so.choice), ("grammar", so.grammar))
                 if v is not None] + ([("json_object", True)] if so.json_object else [])
        if len(forms) != 1:
            raise bad_request("structured_outputs needs exactly one of json, regex, choice, "
                              "grammar, json_object", "structured_outputs")
        found.append((_form(*forms[0], "structured_outputs"), "structured_outputs"))
    for kind in ("json", "regex", "choice", "grammar"):
        value = getattr(req, f"guided_{kind}")
        if value is not None:
            found.append((_form(kind, value, f"guided_{kind}"), f"guided_{kind}"))
    if len(found) > 1:
        raise bad_request("give at most one of response_format, structured_outputs and "
                          f"guided_*; got {', '.join(p for _, p in found)}", found[1][1])
    if req.guided_decoding_backend not in BACKENDS:
        raise bad_request("guided_decoding_backend must be 'xgrammar' (or 'auto'), got "
                          f"{req.guided_decoding_backend!r}", "guided_decoding_backend")
    return found[0] if found else None


def _form(kind: str, value: Any, param: str) -> GrammarSpec:
    if kind == "json":
        return _schema(value, param)
    if kind == "json_object":
        return GrammarSpec("json_object")
    if kind == "choice":
        return GrammarSpec("choice", json.dumps(value))
    return GrammarSpec("regex" if kind == "regex" else "grammar", value)


def _schema(schema: Any, param: str) -> GrammarSpec:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise bad_request(f"{param}: the JSON schema is not valid JSON: {e}", param) \
                from None
    if not isinstance(schema, (dict, bool)):
        raise bad_request(f"{param}: a JSON schema must be an object", param)
    return GrammarSpec("json_schema", json.dumps(schema))   # property order kept


class StructuredOutputs:
    """Compiles grammars in one worker thread (xgrammar's compiler is not re-entrant per
    spec, and one thread keeps compile CPU off the cores the engine uses)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int,
                 stop_token_ids: Iterable[int] = ()) -> None:
        self.compiler = GrammarCompiler(tokenizer, vocab_size, stop_token_ids)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")

    def warm_up(self) -> None:
        """Build the tokenizer table in the background now, not on the first request."""
        self.pool.submit(self.compiler.compile, GrammarSpec("json_object"))

    async def grammar(self, req: Any,
                      tool_grammar: GrammarSpec | None = None) -> CompiledGrammar | None:
        """The request's compiled grammar, or None. ``tool_grammar``: the one its
        ``tool_choice`` sets (server/tools.py), which no other form may accompany."""
        found = spec_of(req)
        if tool_grammar is not None:
            if found is not None:
                raise bad_request(f"tool_choice 'required' or a named function constrains "
                                  f"the reply; {found[1]} cannot also", found[1])
            found = (tool_grammar, "tools")
        if found is None:
            return None
        spec, param = found
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.pool, self.compiler.compile, spec)
        except GrammarError as e:
            raise bad_request(f"{param}: invalid {spec.kind.replace('_', ' ')}: {e}",
                              param) from None
