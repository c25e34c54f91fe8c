"""Offline API, like vLLM's ``LLM``: ``LLM().generate(prompts, params)``."""

from __future__ import annotations

import itertools
from dataclasses import replace

from itt_runtime.engine.llm_engine import EngineConfig, LLMEngine
from itt_runtime.outputs import CompletionOutput, RequestOutput
from itt_runtime.sampling_params import SamplingParams


def merge(acc: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Fold a delta output into the accumulated one."""
    if acc is None:
        acc = replace(delta, outputs=[])
    by_index = {c.index: c for c in acc.outputs}
    for d in delta.outputs:
        c = by_index.get(d.index)
        if c is None:
            c = by_index[d.index] = CompletionOutput(d.index, "", [], [],
                                                     [] if d.logprobs is not None else None)
        c.text += d.text
        c.token_ids += d.token_ids
        c.thinking += d.thinking
        c.applied_think_budgets += d.applied_think_budgets
        if d.logprobs is not None:
            c.logprobs = (c.logprobs or []) + d.logprobs
        c.cumulative_logprob = d.cumulative_logprob
        c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
    acc.outputs = [by_index[i] for i in sorted(by_index)]
    acc.finished = delta.finished
    if delta.prompt_logprobs is not None:
        acc.prompt_logprobs = delta.prompt_logprobs
    return acc


class LLM:
    def __init__(self, model: str = "default", **engine_args) -> None:
        self.engine = LLMEngine(EngineConfig(model=str(model), **engine_args))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def get_default_sampling_params(self) -> SamplingParams:
        """``SamplingParams()`` with the model's generation_config.json defaults (as vLLM's
        ``LLM.get_default_sampling_params``); what ``generate`` uses when given none."""
        return SamplingParams(**self.engine.info.sampling_defaults)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) \
            -> list[RequestOutput]:
        """``prompts``: a string, a list of strings, or a list of token-id lists."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or self.get_default_sampling_params()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = []
        for prompt, p in zip(prompts, params_list):
            tokens = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            rid = str(next(self._ids))
            self.engine.add_request(rid, tokens, p)
            ids.append(rid)
        results: dict[str, RequestOutput] = {}
        errors: dict[str, str] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.error is not None:
                    errors[out.request_id] = out.error
                results[out.request_id] = merge(results.get(out.request_id), out)
        if errors:
            rid, error = next(iter(errors.items()))
            raise RuntimeError(f"{len(errors)} of {len(ids)} prompts failed; prompt "
                               f"{ids.index(rid)}: {error}")
        return [results[r] for r in ids]
