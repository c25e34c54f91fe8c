"""Per-request sampling parameters, validated once at the engine's edge."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from itt_runtime.sampling.structured_output import CompiledGrammar

# Seeds: signed or unsigned 64-bit. A sequence's generator takes (seed + i) mod 2**64, where
# i is its index among the request's n completions.
SEED_MIN, SEED_MAX = -2**63, 2**64 - 1


class ParamError(ValueError):
    """An invalid request parameter. ``param`` names it (the server turns this into a 400)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                     # -1 or 0: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None         # top-k logprobs per generated token (0: chosen only)
    prompt_logprobs: int | None = None  # same for prompt tokens (echo scoring)
    think_budget: float | None = None   # None: the model's default budget
    # With elastic thinking on, the server may lower this request's budget under load, but
    # never below this (None: the budget is fixed).
    min_think_budget: float | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Structured outputs: a grammar compiled by structured_output.GrammarCompiler (the server
    # compiles it before submitting, so the engine never waits for a compile).
    grammar: CompiledGrammar | None = None

    MAX_LOGPROBS = 20
    MAX_STOP_TOKEN_IDS = 1024

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def validate(self) -> None:
        def need(cond: bool, param: str, msg: str) -> None:
            if not cond:
                raise ParamError(param, msg)

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return (isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v))

        need(is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens",
             f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        need(is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
             f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
             f"got {self.min_tokens!r}")
        need(is_num(self.temperature) and 0.0 <= self.temperature <= 2.0, "temperature",
             f"temperature must be in [0, 2], got {self.temperature!r}")
        need(is_num(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p",
             f"top_p must be in (0, 1], got {self.top_p!r}")
        need(is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 0), "top_k",
             f"top_k must be -1 (disabled) or a non-negative integer, got {self.top_k!r}")
        need(is_num(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p",
             f"min_p must be in [0, 1], got {self.min_p!r}")
        need(self.seed is None or (is_int(self.seed) and SEED_MIN <= self.seed <= SEED_MAX),
             "seed", f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            need(is_num(v) and -2.0 <= v <= 2.0, name, f"{name} must be in [-2, 2], got {v!r}")
        need(is_num(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 2.0,
             "repetition_penalty",
             f"repetition_penalty must be in (0, 2], got {self.repetition_penalty!r}")
        need(all(isinstance(s, str) and s for s in self.stop), "stop",
             "stop must be a non-empty string or a list of non-empty strings")
        need(all(is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
             "stop_token_ids must be a list of non-negative integers")
        need(len(self.stop_token_ids) <= self.MAX_STOP_TOKEN_IDS, "stop_token_ids",
             f"at most {self.MAX_STOP_TOKEN_IDS} stop_token_ids are allowed")
        need(is_int(self.n) and 1 <= self.n <= 16, "n", f"n must be in [1, 16], got {self.n!r}")
        need(not (self.n > 1 and self.greedy), "n",
             "n > 1 needs sampling (temperature > 0): greedy choices would all be identical")
        need(self.grammar is None or self.min_tokens == 0, "min_tokens",
             "min_tokens cannot be combined with structured outputs (the grammar decides "
             "where the output ends)")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            need(v is None or (is_int(v) and 0 <= v <= self.MAX_LOGPROBS), name,
                 f"{name} must be an integer in [0, {self.MAX_LOGPROBS}], got {v!r}")
        need(self.think_budget is None
             or (is_num(self.think_budget) and 0.0 <= self.think_budget <= 1.0),
             "think_budget", f"think_budget must be a number in [0, 1], got {self.think_budget!r}")
        need(self.min_think_budget is None
             or (is_num(self.min_think_budget) and 0.0 <= self.min_think_budget <= 1.0),
             "min_think_budget",
             f"min_think_budget must be a number in [0, 1], got {self.min_think_budget!r}")
        need(self.min_think_budget is None or self.think_budget is None
             or self.min_think_budget <= self.think_budget, "min_think_budget",
             f"min_think_budget {self.min_think_budget} is above think_budget "
             f"{self.think_budget}")
