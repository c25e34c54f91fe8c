"""What completions and chat share: model-name check, request → SamplingParams, usage with
ITT's ``thinking`` summary, and response ids."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from itt_runtime.sampling.structured_output import CompiledGrammar
from itt_runtime.sampling_params import ParamError, SamplingParams
from server.errors import APIError, from_param_error
from server.protocol import GenerationRequest
from server.responses import PromptTokensDetails, ThinkingUsage, Usage


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_model(requested: str | None, served: list[str]) -> str:
    """The served name the response reports; 404 for a model this server does not serve."""
    if requested is None or requested == "":
        return served[0]
    if requested not in served:
        raise APIError(404, f"the model {requested!r} does not exist; this server serves "
                       f"{', '.join(repr(s) for s in served)}", param="model",
                       code="model_not_found")
    return requested


def sampling_params(req: GenerationRequest, max_tokens: int, logprobs: int | None = None,
                    prompt_logprobs: int | None = None,
                    extra_stop: Iterable[str] = (),
                    grammar: CompiledGrammar | None = None,
                    defaults: Mapping[str, Any] | None = None) -> SamplingParams:
    """The engine's parameters for a request; a bad value is a 400 naming it. ``defaults``:
    the model's sampling defaults (generation_config.json, ``EngineInfo.sampling_defaults``)
    for the fields the request leaves unset, as vLLM's ``--generation-config auto``."""
    unset = {k: v for k, v in (defaults or {}).items() if k not in req.model_fields_set}
    try:
        params = SamplingParams(
            max_tokens=max_tokens, min_tokens=req.min_tokens, temperature=req.temperature,
            top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, seed=req.seed,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            stop=req.stop_list + [s for s in extra_stop if s not in req.stop_list],
            stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos, n=req.n,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            think_budget=req.think_budget, min_think_budget=req.min_think_budget,
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output, grammar=grammar)
        if unset:
            params = replace(params, **unset)
        return params
    except ParamError as e:
        raise from_param_error(e) from None


class UsageCounter:
    """Accumulates token counts and per-token thinking depth over all choices of a request,
    and the prefix-cache hits of each prompt (counted once per prompt, whatever ``n``)."""

    def __init__(self, think_budget: float, max_extra_steps: int) -> None:
        self.think_budget = think_budget
        self.max_extra_steps = max_extra_steps
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.extra_steps = 0
        self.applied_budget_sum = 0.0            # over generated tokens (elastic thinking)
        self.cached: dict[int, int] = {}         # prompt index -> its cached tokens

    def add_prompt(self, num_tokens: int) -> None:
        self.prompt_tokens += num_tokens

    def set_cached(self, prompt_index: int, num_cached_tokens: int) -> None:
        """Every output of a request carries its prompt's ``num_cached_tokens``: the latest
        one stands for the prompt."""
        self.cached[prompt_index] = num_cached_tokens

    def add_tokens(self, thinking: list[int], applied_budgets: list[float]) -> None:
        self.completion_tokens += len(thinking)
        self.extra_steps += sum(thinking)
        self.applied_budget_sum += sum(applied_budgets)

    def usage(self) -> Usage:
        mean = self.extra_steps / self.completion_tokens if self.completion_tokens else 0.0
        depth = mean / self.max_extra_steps if self.max_extra_steps else 0.0
        applied = (self.applied_budget_sum / self.completion_tokens if self.completion_tokens
                   else self.think_budget)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(
                         cached_tokens=sum(self.cached.values())),
                     thinking=ThinkingUsage(think_budget=self.think_budget,
                                            applied_think_budget=applied,
                                            mean_extra_steps=mean,
                                            mean_normalized_depth=depth))
