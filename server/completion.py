"""``POST /v1/completions``: prompts in, OpenAI completion (or SSE chunks) out, with ITT's
``think_budget``, ``usage.thinking`` and optional per-token ``thinking``."""

from __future__ import annotations

from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response

from itt_runtime.llm import merge
from itt_runtime.outputs import CompletionOutput, RequestOutput
from itt_runtime.sampling_params import SamplingParams
from server.errors import bad_request
from server.generation import UsageCounter, new_id, sampling_params
from server.handler import GenerationHandler
from server.logprobs import CompletionLogprobsBuilder, extend, prompt_logprobs
from server.protocol import MAX_PROMPTS, CompletionRequest
from server.responses import Completion, CompletionChoice, CompletionLogprobs
from server.tokens import check_size, encode


@dataclass
class Prompt:
    ids: list[int]
    text: str                         # what ``echo`` returns


@dataclass
class _Run:
    """One request as it runs: its prompts, parameters and per-choice streaming state."""
    req: CompletionRequest
    model: str
    prompts: list[Prompt]
    params: SamplingParams
    usage: UsageCounter
    id: str = field(default_factory=lambda: new_id("cmpl"))
    builders: dict[int, CompletionLogprobsBuilder] = field(default_factory=dict)
    prompt_logprobs: dict[int, list] = field(default_factory=dict)


class CompletionHandler(GenerationHandler):
    async def create(self, req: CompletionRequest, request: Request) -> Response:
        model = self.begin(req)
        prompts = self._prompts(req)
        echo_lp = req.logprobs if req.echo and req.logprobs is not None else None
        grammar = await self.client.structured.grammar(req)
        params = sampling_params(req, 16 if req.max_tokens is None else req.max_tokens,
                                 logprobs=req.logprobs,
                                 prompt_logprobs=echo_lp if echo_lp is not None
                                 else req.prompt_logprobs,
                                 grammar=grammar,
                                 defaults=self.client.info.sampling_defaults)
        usage = self.usage_for([p.ids for p in prompts], params)
        run = _Run(req, model, prompts, params, usage)
        return await self.respond(request, req.stream, len(prompts) * params.n,
                                  lambda: self._stream(run), lambda: self._complete(run))

    # ---- prompts --------------------------------------------------------------------------
    def _prompts(self, req: CompletionRequest) -> list[Prompt]:
        """A string, strings, token ids, or lists of token ids → prompts (400 if empty),
        BOS first unless ``add_special_tokens`` is false, truncated on the left to
        ``truncate_prompt_tokens``."""
        tok = self.client.tokenizer
        prompt: list = [req.prompt] if isinstance(req.prompt, str) or (
            req.prompt and isinstance(req.prompt[0], int)) else list(req.prompt)
        if not prompt:
            raise bad_request("the prompt is empty", "prompt")
        if len(prompt) > MAX_PROMPTS:
            raise bad_request(f"at most {MAX_PROMPTS} prompts are allowed per request, got "
                              f"{len(prompt)}", "prompt")
        out = []
        for p in prompt:
            if not p:
                raise bad_request("the prompt is empty", "prompt")
            if isinstance(p, str):
                check_size(tok, p, self.client.max_model_len, "prompt")
                ids = encode(tok, p, req.add_special_tokens)
            else:
                self.client.validate_prompt(p)
                ids = list(p)
            kept = req.truncate(ids, self.client.max_model_len)
            text = p if isinstance(p, str) and len(kept) == len(ids) else tok.decode(kept)
            out.append(Prompt(kept, text))
        return out

    # ---- one response ---------------------------------------------------------------------
    async def _complete(self, run: _Run) -> Completion:
        accs: list[RequestOutput | None] = [None] * len(run.prompts)
        ids = [p.ids for p in run.prompts]
        async with aclosing(self.client.generate_all(ids, run.params, run.id)) as outputs:
            async for i, out in outputs:
                run.usage.set_cached(i, out.num_cached_tokens)
                accs[i] = merge(accs[i], out)
        choices = []
        for i, acc in enumerate(accs):
            assert acc is not None, "generate_all ends every prompt with a final output"
            if acc.prompt_logprobs is not None:
                run.prompt_logprobs[i] = acc.prompt_logprobs
            for c in acc.outputs:
                choice = self._choice(run, i, c, first=True)
                if run.req.prompt_logprobs is not None:       # vLLM's, per choice
                    choice.prompt_logprobs = prompt_logprobs(
                        self.client.tokenizer, run.prompts[i].ids, acc.prompt_logprobs or [],
                        run.req.prompt_logprobs)
                choices.append(choice)
        return Completion(id=run.id, model=run.model, choices=choices, usage=run.usage.usage())

    # ---- a stream -------------------------------------------------------------------------
    async def _stream(self, run: _Run):
        ids = [p.ids for p in run.prompts]
        started: set[int] = set()
        async with aclosing(self.client.generate_all(ids, run.params, run.id)) as outputs:
            async for i, out in outputs:
                run.usage.set_cached(i, out.num_cached_tokens)
                if out.prompt_logprobs is not None:
                    run.prompt_logprobs[i] = out.prompt_logprobs
                for c in out.outputs:
                    index = i * run.params.n + c.index
                    choice = self._choice(run, i, c, first=index not in started)
                    started.add(index)
                    if choice.text or choice.finish_reason or c.token_ids:
                        yield Completion(id=run.id, model=run.model, choices=[choice])
        if run.req.include_usage:
            yield Completion(id=run.id, model=run.model, choices=[], usage=run.usage.usage())

    def _choice(self, run: _Run, i: int, c: CompletionOutput, first: bool) -> CompletionChoice:
        """The choice (or chunk of it) for output ``c`` of prompt ``i``. The first chunk of a
        choice carries the echoed prompt."""
        req, prompt = run.req, run.prompts[i]
        index = i * run.params.n + c.index
        run.usage.add_tokens(c.thinking, c.applied_think_budgets)
        text = (prompt.text if req.echo and first else "") + c.text
        logprobs: CompletionLogprobs | None = None
        if req.logprobs is not None:
            if first:
                run.builders[index] = CompletionLogprobsBuilder(
                    self.client.tokenizer, [] if req.echo else prompt.ids)
            builder = run.builders[index]
            if req.echo and first:
                entries = run.prompt_logprobs.get(i) or [None] * len(prompt.ids)
                logprobs = builder.add(prompt.ids, entries)
            logprobs = extend(logprobs, builder.add(c.token_ids, c.logprobs or []))
        return CompletionChoice(index=index, text=text, logprobs=logprobs,
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                thinking=list(c.thinking) if req.return_thinking else None)
