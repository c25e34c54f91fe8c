"""What the engine hands back: per-request outputs, with thinking depth per generated token."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int                                   # 0 … n-1
    text: str                                    # full text so far, or the delta (streaming)
    token_ids: list[int]
    # Per generated token: the extra routed steps it took (``extra_steps`` inside the engine;
    # ITT_SPEC's thinking depth is n_layers + this). The API calls it ``thinking``.
    thinking: list[int] = field(default_factory=list)
    # Per generated token: {token_id: logprob} with the chosen token first, then the top-k.
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None             # "stop" | "length" | "abort" | None
    stop_reason: str | int | None = None         # the stop string or stop token that fired
    # Per generated token: the think budget its position was computed at (elastic thinking
    # may lower it below the requested one).
    applied_think_budgets: list[float] = field(default_factory=list)


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    think_budget: float
    metrics: RequestMetrics
    # One entry per prompt token (the first is None): {token_id: logprob} as in CompletionOutput.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # Set when serving this request raised: the request was ended, the engine goes on.
    error: str | None = None
    # Prompt tokens whose KV came from the prefix cache (OpenAI's cached_tokens).
    num_cached_tokens: int = 0
