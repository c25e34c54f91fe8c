"""Request bodies of the HTTP API (Pydantic lives only in ``server/``).

Types are checked here (strictly: ``"0.5"`` is not a number, ``true`` is not an integer);
ranges are checked once, by ``SamplingParams``, so both layers name the same parameter.
Unknown fields are ignored and ``null`` means "not given", as in OpenAI's and vLLM's servers.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from server.errors import bad_request, from_validation_error

# Every integer is bounded (a JSON number can have any number of digits): to int64, except
# seeds, which may also be unsigned 64-bit (see SamplingParams).
Int = Annotated[int, Field(strict=True, ge=-2**63, le=2**63 - 1)]
Seed = Annotated[int, Field(strict=True, ge=-2**63, le=2**64 - 1)]


def documented(lo: float | None = None, hi: float | None = None, exclusive_lo: bool = False):
    """Publish a range in the OpenAPI schema only: SamplingParams checks it, once, with a
    message naming the parameter (pydantic would word it differently per field)."""
    extra: dict[str, Any] = {}
    if lo is not None:
        extra["exclusiveMinimum" if exclusive_lo else "minimum"] = lo
    if hi is not None:
        extra["maximum"] = hi
    return Field(json_schema_extra=extra)
Float = Annotated[float, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]

MAX_PROMPTS = 128          # prompts in one /v1/completions request
MAX_STOP = 16              # stop strings in one request
MAX_JSON_DEPTH = 32        # nesting of a request body (ours need 4)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """``"temperature": null`` is the same as leaving it out (OpenAI's and vLLM's rule)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(_Body):
    include_usage: Bool = False


class JSONSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | Bool | None = Field(default=None, alias="schema")
    strict: Bool | None = None      # outputs always follow the schema (as strict: true)


class ResponseFormat(_Body):
    """OpenAI's ``response_format``: ``text``, ``json_object`` (any JSON object) or
    ``json_schema``."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputsParams(_Body):
    """vLLM's ``structured_outputs``: exactly one of these."""
    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: Bool | None = None
    whitespace_pattern: Any = None          # not supported: 400 when given
    structural_tag: Any = None              # not supported: 400 when given


# Fields of OpenAI's or vLLM's API that itt-server does not implement. Given with any value
# other than the listed no-op ones they are a 400 naming them, never silently ignored.
UNSUPPORTED_COMMON: dict[str, tuple] = {
    "priority": (0,), "use_beam_search": (False,), "length_penalty": (1.0,),
    "spaces_between_special_tokens": (True,), "allowed_token_ids": (), "bad_words": ([],),
    "logits_processors": (), "return_tokens_as_token_ids": (False,),
    "return_token_ids": (False,), "cache_salt": (), "kv_transfer_params": (),
    "vllm_xargs": (), "request_id": (), "guided_whitespace_pattern": (),
    "structural_tag": (), "service_tier": ("auto", "default"),
}
UNSUPPORTED_CHAT: dict[str, tuple] = {
    "functions": (), "function_call": (), "audio": (),
    "modalities": (["text"],), "prediction": (), "reasoning_effort": (),
    "web_search_options": (), "verbosity": (), "chat_template": (), "documents": (),
    "mm_processor_kwargs": (),
}


class GenerationRequest(_Body):
    """Fields shared by completions and chat: OpenAI's, vLLM's extensions, and ITT's."""

    model: str | None = None
    max_tokens: Annotated[Int | None, documented(1)] = None
    temperature: Annotated[Float, documented(0, 2)] = 1.0
    top_p: Annotated[Float, documented(0, 1, exclusive_lo=True)] = 1.0
    n: Annotated[Int, documented(1, 16)] = 1
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: Annotated[Float, documented(-2, 2)] = 0.0
    frequency_penalty: Annotated[Float, documented(-2, 2)] = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None
    # vLLM extensions
    top_k: Annotated[Int, documented(-1)] = -1
    min_p: Annotated[Float, documented(0, 1)] = 0.0
    repetition_penalty: Annotated[Float, documented(0, 2, exclusive_lo=True)] = 1.0
    min_tokens: Annotated[Int, documented(0)] = 0
    ignore_eos: Bool = False
    stop_token_ids: list[Int] | None = None
    skip_special_tokens: Bool = True
    include_stop_str_in_output: Bool = False
    # vLLM's
    add_special_tokens: Bool = True         # BOS before the prompt
    truncate_prompt_tokens: Annotated[Int | None, documented(-1)] = None
    prompt_logprobs: Annotated[Int | None, documented(0, 20)] = None   # not streamed
    # Structured outputs (server/structured.py)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    # Informational (accepted, unused)
    metadata: dict[str, Any] | None = None
    store: Bool | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Not supported: declared so that giving them is a 400 (UNSUPPORTED_COMMON)
    priority: Any = None
    use_beam_search: Any = None
    length_penalty: Any = None
    spaces_between_special_tokens: Any = None
    allowed_token_ids: Any = None
    bad_words: Any = None
    logits_processors: Any = None
    return_tokens_as_token_ids: Any = None
    return_token_ids: Any = None
    cache_salt: Any = None
    kv_transfer_params: Any = None
    vllm_xargs: Any = None
    request_id: Any = None
    guided_whitespace_pattern: Any = None
    structural_tag: Any = None
    service_tier: Any = None
    # ITT extensions
    think_budget: Annotated[Float | None, documented(0, 1)] = None
    min_think_budget: Annotated[Float | None, documented(0, 1)] = None
    return_thinking: Bool = False

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check(self) -> None:
        """The field checks Pydantic cannot express (a 400 naming the field)."""
        self.check_common()

    def check_common(self) -> None:
        """Request-level rules that SamplingParams cannot see."""
        if len(self.stop_list) > MAX_STOP:
            raise bad_request(f"at most {MAX_STOP} stop strings are allowed, got "
                              f"{len(self.stop_list)}", "stop")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true",
                              "stream_options")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")
        reject_unsupported(self, UNSUPPORTED_COMMON)
        if self.prompt_logprobs is not None and self.stream:
            raise bad_request("prompt_logprobs is not available when streaming (as in vLLM)",
                              "prompt_logprobs")
        so = self.structured_outputs
        if so is not None and (so.whitespace_pattern is not None
                               or so.structural_tag is not None):
            raise bad_request("structured_outputs: whitespace_pattern and structural_tag are "
                              "not supported", "structured_outputs")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < -1 \
                or self.truncate_prompt_tokens == 0:
            raise bad_request("truncate_prompt_tokens must be -1 (the context length) or an "
                              f"integer >= 1, got {self.truncate_prompt_tokens}",
                              "truncate_prompt_tokens")

    def truncate(self, ids: list[int], max_model_len: int) -> list[int]:
        """vLLM's ``truncate_prompt_tokens``: keep the last k prompt tokens."""
        k = self.truncate_prompt_tokens
        if k is None:
            return ids
        return ids[-(max_model_len if k == -1 else k):]


def reject_unsupported(req: BaseModel, fields: dict[str, tuple]) -> None:
    for name, harmless in fields.items():
        value = getattr(req, name)
        if value is not None and not any(value == h and type(value) is type(h)
                                         or (isinstance(h, float) and value == h
                                             and not isinstance(value, bool))
                                         for h in harmless):
            raise bad_request(f"{name} is not supported by itt-server"
                              + (f" (only {', '.join(map(repr, harmless))})" if harmless
                                 else ""), name)


PromptField = str | list[str] | list[Int] | list[list[Int]]


class CompletionRequest(GenerationRequest):
    prompt: PromptField
    echo: Bool = False
    logprobs: Annotated[Int | None, documented(0, 20)] = None
    best_of: Int | None = None
    suffix: str | None = None

    def check(self) -> None:
        self.check_common()
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of is not supported (it must equal n)", "best_of")
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if self.echo and self.logprobs is not None and self.prompt_logprobs is not None \
                and self.prompt_logprobs != self.logprobs:
            raise bad_request("with echo and logprobs, prompt_logprobs must equal logprobs "
                              "(the prompt is scored once)", "prompt_logprobs")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str | dict[str, Any]     # OpenAI's is JSON text; some clients send an object


class MessageToolCall(_Body):
    """A call in an assistant message of the conversation (OpenAI's shape)."""
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None     # assistant: the calls it made
    tool_call_id: str | None = None                     # tool: the call this answers

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def template_fields(self) -> dict[str, Any]:
        """The message as a chat template sees it (transformers' and vLLM's shape): a call's
        arguments as an object where they are JSON text of one (templates write them with
        ``tojson``)."""
        d: dict[str, Any] = {"role": self.role, "content": self.text}
        if self.name is not None:
            d["name"] = self.name
        if self.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments_object(c.function.arguments)}}
                for c in self.tool_calls]
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        return d


def _arguments_object(arguments: str | dict[str, Any]) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments            # as written: the template shows what was sent
    return arguments


class FunctionDefinition(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None        # a JSON schema; none: no parameters
    strict: Bool | None = None                      # calls always follow it (as strict)


class ToolDefinition(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage]
    logprobs: Bool = False
    top_logprobs: Annotated[Int | None, documented(0, 20)] = None
    max_completion_tokens: Int | None = None
    # Tool calling (server/tools.py)
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: Bool = True
    # vLLM's chat template controls, and echo of the last (assistant) message
    echo: Bool = False
    # As vLLM: the chat template writes BOS itself ({{ bos_token }}), so none is added.
    add_special_tokens: Bool = False
    add_generation_prompt: Bool = True
    continue_final_message: Bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # Not supported: declared so that giving them is a 400 (UNSUPPORTED_CHAT)
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    verbosity: Any = None
    chat_template: Any = None
    documents: Any = None
    mm_processor_kwargs: Any = None

    def check(self) -> None:
        self.check_common()
        if not self.messages:
            raise bad_request("messages must not be empty", "messages")
        reject_unsupported(self, UNSUPPORTED_CHAT)
        kwargs = self.chat_template_kwargs or {}
        if not isinstance(kwargs.get("add_generation_prompt", False), bool):
            raise bad_request("chat_template_kwargs: add_generation_prompt must be a boolean",
                              "chat_template_kwargs")
        for key in ("messages", "tools", "documents", "continue_final_message"):
            if key in kwargs:
                raise bad_request(f"chat_template_kwargs may not set {key!r}",
                                  "chat_template_kwargs")
        if self.continue_final_message:
            if self.messages[-1].role != "assistant":
                raise bad_request("continue_final_message needs the last message to be the "
                                  "assistant's", "continue_final_message")
            if self.generation_prompt:
                raise bad_request("continue_final_message and add_generation_prompt cannot "
                                  "both be true", "continue_final_message")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        for i, m in enumerate(self.messages):
            if m.tool_calls and m.role != "assistant":
                raise bad_request(f"messages[{i}]: only assistant messages have tool_calls",
                                  "messages")
            if m.role == "tool" and not m.tool_call_id:
                raise bad_request(f"messages[{i}]: a tool message needs the tool_call_id of "
                                  "the call it answers", "messages")

    @property
    def generation_prompt(self) -> bool:
        """``add_generation_prompt``, which ``chat_template_kwargs`` may also set."""
        return bool((self.chat_template_kwargs or {}).get("add_generation_prompt",
                                                          self.add_generation_prompt))

    @property
    def template_kwargs(self) -> dict[str, Any]:
        """What the chat template gets besides the conversation (``enable_thinking``…)."""
        return {k: v for k, v in (self.chat_template_kwargs or {}).items()
                if k != "add_generation_prompt"}

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens


class TokenizeRequest(_Body):
    """vLLM's /tokenize: either ``prompt`` or chat ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    # vLLM's: True for a prompt, False for messages (the chat template writes BOS).
    add_special_tokens: Bool | None = None
    add_generation_prompt: Bool = True
    return_token_strs: Bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[Int]


Body = TypeVar("Body", bound=BaseModel)


async def parse_body(request: Request, cls: type[Body]) -> Body:
    """Read and validate a JSON body; every failure is a 400 naming what is wrong."""
    ctype = request.headers.get("content-type", "")
    if ctype and ctype.split(";")[0].strip().lower() != "application/json":
        raise bad_request(f"Content-Type must be application/json, got {ctype!r}")
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise bad_request(f"the request body is nested deeper than {MAX_JSON_DEPTH} "
                          "levels") from None
    check_json(data)
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e.errors()) from None


def check_json(data: Any) -> None:
    """400 for a body nested deeper than MAX_JSON_DEPTH or holding a string that is not valid
    Unicode (JSON lets ``"\\ud800"`` through, a lone surrogate that no encoder can write).
    Iterative, so no body can exhaust the stack here."""
    todo: list[tuple[Any, tuple, int]] = [(data, (), 1)]
    while todo:
        value, path, depth = todo.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad_request(f"the request body is nested deeper than {MAX_JSON_DEPTH} "
                              "levels", _param(path))
        if isinstance(value, dict):
            for k, v in value.items():
                _check_text(k, path + (k,))
                todo.append((v, path + (k,), depth + 1))
        elif isinstance(value, list):
            todo.extend((v, path + (i,), depth + 1) for i, v in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, path)


def _check_text(text: str, path: tuple) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        where = _printable(".".join(str(p) for p in path)) or "body"
        raise bad_request(f"{where}: the string is not valid Unicode (a lone UTF-16 "
                          "surrogate)", _param(path)) from None


def _param(path: tuple) -> str | None:
    return _printable(str(path[0])) if path else None


def _printable(text: str) -> str:
    """``text`` with lone surrogates escaped, so that an error body can carry it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
