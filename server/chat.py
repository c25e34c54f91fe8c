"""``POST /v1/chat/completions``: messages → the chat template → the engine, with the same
extensions as completions."""

from __future__ import annotations

from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response

from itt_runtime.llm import merge
from itt_runtime.outputs import CompletionOutput
from itt_runtime.sampling_params import SamplingParams
from itt_runtime.tokenizers.chat_template import ChatTemplate, ChatTemplateError
from server.engine_client import EngineClient
from server.errors import bad_request
from server.generation import UsageCounter, new_id, sampling_params
from server.handler import GenerationHandler
from server.lifecycle import Lifecycle
from server.logprobs import ChatLogprobsBuilder, prompt_logprobs
from server.protocol import ChatCompletionRequest
from server.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    DeltaFunction,
    DeltaToolCall,
    FunctionOut,
    ToolCallOut,
)
from server.tokens import check_size, encode
from server.tool_parsers import ToolCall, ToolCallDelta, ToolCallParser, parse_all
from server.tools import ToolPlan, plan


@dataclass
class _Run:
    req: ChatCompletionRequest
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    usage: UsageCounter
    id: str = field(default_factory=lambda: new_id("chatcmpl"))
    builders: dict[int, ChatLogprobsBuilder] = field(default_factory=dict)
    content_started: set[int] = field(default_factory=set)
    echo: str = ""              # echo: the last (assistant) message, before the reply
    strip: bool = False         # drop the reply's leading whitespace (after "Assistant:")
    tools: ToolPlan | None = None
    parsers: dict[int, ToolCallParser] = field(default_factory=dict)   # streaming, per choice


class ChatHandler(GenerationHandler):
    def __init__(self, client: EngineClient, served_models: list[str],
                 lifecycle: Lifecycle, template: ChatTemplate,
                 auto_tool_parser: str | None = None) -> None:
        super().__init__(client, served_models, lifecycle)
        self.template = template
        self.auto_tool_parser = auto_tool_parser     # for tool_choice "auto"; None: refused

    async def create(self, req: ChatCompletionRequest, request: Request) -> Response:
        model = self.begin(req)
        tools = plan(req, self.auto_tool_parser)
        text = render(self.template, req.messages, req.generation_prompt,
                      req.continue_final_message, req.template_kwargs,
                      tools.tools if tools else None)
        check_size(self.client.tokenizer, text, self.client.max_model_len, "messages")
        ids = req.truncate(encode(self.client.tokenizer, text, req.add_special_tokens),
                           self.client.max_model_len)
        # Like vLLM: without max_tokens the reply may use the rest of the context.
        max_tokens = req.max_new_tokens
        if max_tokens is None:
            max_tokens = max(self.client.max_model_len - len(ids), 1)
        top = (req.top_logprobs or 0) if req.logprobs else None
        grammar = await self.client.structured.grammar(req, tools.grammar if tools else None)
        params = sampling_params(req, max_tokens, logprobs=top,
                                 extra_stop=list(self.template.stop), grammar=grammar,
                                 prompt_logprobs=req.prompt_logprobs,
                                 defaults=self.client.info.sampling_defaults)
        usage = self.usage_for([ids], params)
        run = _Run(req, model, ids, params, usage,
                   strip=self.template.strip_reply and not req.continue_final_message,
                   tools=tools)
        if tools is not None:
            self.client.metrics.count_tool_request(tools.choice)
        last = req.messages[-1]
        if req.echo and last.role == "assistant":       # as vLLM: echo the last message
            run.echo = last.text
        return await self.respond(request, req.stream, params.n,
                                  lambda: self._stream(run), lambda: self._complete(run))

    async def _complete(self, run: _Run) -> ChatCompletion:
        acc = None
        async with aclosing(self.client.generate(run.prompt_ids, run.params, run.id)) as outs:
            async for out in outs:
                run.usage.set_cached(0, out.num_cached_tokens)
                acc = merge(acc, out)
        assert acc is not None, "generate ends with a final output"
        choices = []
        for c in acc.outputs:
            content, logprobs, thinking = self._parts(run, c)
            message = ChatMessageOut(content=content)
            parser = run.tools.new_parser() if run.tools else None
            if parser is not None:
                text, calls = parse_all(parser, content)
                self._count_failures(run, parser)
                if calls:
                    message = ChatMessageOut(content=text or None,
                                             tool_calls=[_call_out(k) for k in calls])
            choices.append(ChatChoice(index=c.index, message=message, logprobs=logprobs,
                                      finish_reason=self._finish_reason(run, c.finish_reason,
                                                                        message.tool_calls),
                                      stop_reason=self._visible(c.stop_reason),
                                      thinking=thinking))
        plp = None
        if run.req.prompt_logprobs is not None:                  # vLLM's
            plp = prompt_logprobs(self.client.tokenizer, run.prompt_ids,
                                  acc.prompt_logprobs or [], run.req.prompt_logprobs)
        return ChatCompletion(id=run.id, model=run.model, choices=choices,
                              usage=run.usage.usage(), prompt_logprobs=plp)

    async def _stream(self, run: _Run):
        def chunk(choice: ChatChunkChoice) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=run.id, model=run.model, choices=[choice])

        for i in range(run.params.n):          # OpenAI's first chunk: the role
            yield chunk(ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")))
        async with aclosing(self.client.generate(run.prompt_ids, run.params, run.id)) as outs:
            async for out in outs:
                run.usage.set_cached(0, out.num_cached_tokens)
                for c in out.outputs:
                    content, logprobs, thinking = self._parts(run, c)
                    delta, finish = ChatDelta(content=content or None), c.finish_reason
                    parser = self._stream_parser(run, c.index)
                    if parser is not None:
                        delta, finish = self._parse_piece(run, parser, content, finish)
                    if content or c.finish_reason or c.token_ids:
                        yield chunk(ChatChunkChoice(
                            index=c.index, delta=delta, logprobs=logprobs,
                            finish_reason=finish, thinking=thinking))
        if run.req.include_usage:
            yield ChatCompletionChunk(id=run.id, model=run.model, choices=[],
                                      usage=run.usage.usage())

    def _parts(self, run: _Run, c: CompletionOutput):
        """(content, logprobs, thinking) of output ``c``, whole or one chunk of it. The
        reply's leading whitespace (after "Assistant:") is dropped where the model's chat
        format says so (``strip_reply``)."""
        run.usage.add_tokens(c.thinking, c.applied_think_budgets)
        content = c.text
        if c.index not in run.content_started:
            content = run.echo + (content.lstrip() if run.strip else content)
            if content:
                run.content_started.add(c.index)
        logprobs = None
        if run.params.logprobs is not None:
            builder = run.builders.get(c.index)
            if builder is None:
                builder = run.builders[c.index] = ChatLogprobsBuilder(
                    self.client.tokenizer, run.prompt_ids, run.params.logprobs)
            logprobs = ChatLogprobs(content=builder.add(c.token_ids, c.logprobs or []))
        thinking = list(c.thinking) if run.req.return_thinking else None
        return content, logprobs, thinking

    def _stream_parser(self, run: _Run, index: int) -> ToolCallParser | None:
        if run.tools is None:
            return None
        if index not in run.parsers:
            parser = run.tools.new_parser()
            if parser is None:
                return None
            run.parsers[index] = parser
        return run.parsers[index]

    def _parse_piece(self, run: _Run, parser: ToolCallParser, piece: str,
                     finish_reason: str | None) -> tuple[ChatDelta, str | None]:
        """One streamed piece of a reply through its tool-call parser: the delta to send
        (content and call pieces) and the finish reason (``tool_calls`` where it made any)."""
        content, deltas = parser.feed(piece)
        if finish_reason is not None:
            more, rest = parser.finish()
            content, deltas = content + more, deltas + rest
            self._count_failures(run, parser)
            finish_reason = self._finish_reason(run, finish_reason, parser.calls)
        return ChatDelta(content=content or None,
                         tool_calls=[_delta_out(d) for d in deltas] or None), finish_reason

    def _finish_reason(self, run: _Run, reason: str | None, calls) -> str | None:
        """OpenAI's: ``tool_calls`` when the reply made calls, except for a named function
        (the caller chose it: ``stop``); ``length`` stays ``length``."""
        if calls and reason == "stop" and run.tools is not None \
                and run.tools.choice != "named":
            return "tool_calls"
        return reason

    def _count_failures(self, run: _Run, parser: ToolCallParser) -> None:
        if parser.failures and run.tools is not None and run.tools.parser is not None:
            self.client.metrics.count_tool_parse_failures(run.tools.parser, parser.failures)

    def _visible(self, stop_reason):
        """The template's own stop strings are an implementation detail: reported as None."""
        return None if stop_reason in self.template.stop else stop_reason


def _call_out(call: ToolCall) -> ToolCallOut:
    return ToolCallOut(id=call.id, function=FunctionOut(name=call.name,
                                                        arguments=call.arguments))


def _delta_out(d: ToolCallDelta) -> DeltaToolCall:
    first = d.name is not None
    return DeltaToolCall(index=d.index, id=d.id, type="function" if first else None,
                         function=DeltaFunction(name=d.name, arguments=d.arguments))


def render(template: ChatTemplate, messages, add_generation_prompt: bool,
           continue_final_message: bool = False, kwargs=None, tools=None) -> str:
    """The template's text for ``messages``; a failure is a 400 naming ``messages``."""
    try:
        return template.render(messages, add_generation_prompt, continue_final_message, kwargs,
                               tools)
    except ChatTemplateError as e:
        raise bad_request(str(e), "messages") from None
