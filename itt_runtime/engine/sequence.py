"""A sequence in the engine: one completion of one request (a request with n > 1 has n)."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from itt_runtime.outputs import RequestMetrics
from itt_runtime.sampling_params import SamplingParams
from itt_runtime.tokenizers.tokenizer import IncrementalDetokenizer


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: str                       # unique in the engine: "<request_id>" or "<request_id>#i"
    request_id: str
    index: int                        # completion index within the request (0 … n-1)
    prompt_token_ids: list[int]
    params: SamplingParams
    think_budget: float               # the budget new tokens are computed at (elastic: varies)
    thresholds: list[float]           # router-logit threshold per routed stream, at think_budget
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.time()))
    status: Status = Status.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    extra_steps: list[int] = field(default_factory=list)       # per output token (API: thinking)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    num_computed_tokens: int = 0
    # Elastic thinking: the requested budget and the floor; the budget each computed position
    # was computed at (kept across preemption, so a recompute routes exactly as before) and
    # the budget that produced each output token.
    requested_think_budget: float = 0.0
    min_think_budget: float | None = None
    position_budgets: list[float] = field(default_factory=list)
    applied_budgets: list[float] = field(default_factory=list)
    # Set once the budget has left the requested one: from then on its KV no longer matches
    # a prefix-cache key (a flag, not a scan of position_budgets on every step).
    budget_changed: bool = False
    num_cached_tokens: int = 0        # prompt tokens taken from the prefix cache (first admission)
    block_hashes: list[bytes] = field(default_factory=list)   # prefix-cache keys, per full block
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    generator: torch.Generator | None = None
    grammar_matcher: Any = None       # structured outputs: this sequence's grammar state
    # Streaming state: what was already handed to the client.
    text: str = ""
    num_sent_tokens: int = 0
    num_sent_chars: int = 0
    detokenizer: IncrementalDetokenizer | None = None

    @property
    def routable(self) -> bool:
        """Whether its next token can take a routed step: not when every threshold is +inf
        (budget 0)."""
        return any(t < math.inf for t in self.thresholds)

    @property
    def may_route(self) -> bool:
        """Whether any token it computes can take a routed step, a recomputed one included:
        not when it is at budget 0 and every position was computed at that budget."""
        return self.budget_changed or self.routable

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def elastic(self) -> bool:
        return self.min_think_budget is not None

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None
