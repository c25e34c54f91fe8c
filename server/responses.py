"""Response bodies of the HTTP API, in OpenAI's shapes plus ITT's fields.

Fields listed in a model's ``_omit_if_none`` are left out of the JSON when unset (ITT and vLLM
extensions such as ``thinking``), so plain OpenAI clients see plain OpenAI bodies; OpenAI's own
nullable fields (``logprobs``, ``finish_reason``) are always present.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, model_serializer


class _Out(BaseModel):
    _omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_unset_extensions(self, handler) -> dict[str, Any]:
        data = handler(self)
        for key in self._omit_if_none:
            if data.get(key) is None:
                data.pop(key, None)
        return data


def now() -> int:
    return int(time.time())


class ThinkingUsage(_Out):
    """ITT: how much the request thought. Depth is per generated token, averaged.
    ``think_budget`` is the requested budget; ``applied_think_budget`` the token-weighted mean
    of the budgets the tokens were computed at (lower when elastic thinking stepped in)."""
    think_budget: float
    applied_think_budget: float
    mean_extra_steps: float
    mean_normalized_depth: float


class PromptTokensDetails(_Out):
    """OpenAI's: prompt tokens served from the prefix cache (their KV was not computed)."""
    cached_tokens: int = 0


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    thinking: ThinkingUsage | None = None
    _omit_if_none = frozenset({"thinking"})


class PromptLogprob(_Out):
    """vLLM's entry of ``prompt_logprobs`` (keyed by token id)."""
    logprob: float
    rank: int | None          # 1-based rank in the model's distribution; None: beyond top-k
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionLogprobs(_Out):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    thinking: list[int] | None = None
    prompt_logprobs: PromptLogprobs | None = None        # vLLM's
    _omit_if_none = frozenset({"stop_reason", "thinking", "prompt_logprobs"})


class Completion(_Out):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    _omit_if_none = frozenset({"usage"})


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Out):
    content: list[TokenLogprob] | None = None


class FunctionOut(_Out):
    name: str
    arguments: str                  # JSON text, as the model wrote it


class ToolCallOut(_Out):
    id: str
    type: Literal["function"] = "function"
    function: FunctionOut


class ChatMessageOut(_Out):
    role: Literal["assistant"] = "assistant"
    content: str | None             # None: the reply is only tool calls
    tool_calls: list[ToolCallOut] | None = None
    _omit_if_none = frozenset({"tool_calls"})


class ChatChoice(_Out):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    thinking: list[int] | None = None
    _omit_if_none = frozenset({"stop_reason", "thinking"})


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None        # vLLM's
    _omit_if_none = frozenset({"prompt_logprobs"})


class DeltaFunction(_Out):
    name: str | None = None         # on a call's first delta
    arguments: str = ""             # the next piece of the arguments' JSON text
    _omit_if_none = frozenset({"name"})


class DeltaToolCall(_Out):
    """One piece of one call (OpenAI's stream shape): ``id``, ``type`` and the name come on
    the call's first delta, the arguments in pieces after it."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction
    _omit_if_none = frozenset({"id", "type"})


class ChatDelta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    _omit_if_none = frozenset({"role", "content", "tool_calls"})


class ChatChunkChoice(_Out):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    thinking: list[int] | None = None
    _omit_if_none = frozenset({"thinking"})


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    _omit_if_none = frozenset({"usage"})


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "itt-server"
    root: str
    parent: str | None = None
    max_model_len: int
    itt: dict[str, Any]


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]
