"""Drives a load test: warm-up, then closed-loop (a fixed number of concurrent users, each
sending its next request when the previous one finishes) or open-loop (Poisson arrivals at a
fixed rate, however slow the server) traffic, bounded by a request count and/or a duration,
for each point of a sweep (several concurrencies or rates, optionally one budget at a time).
Multi-turn conversations run closed-loop: each user takes the next conversation and sends its
turns one after another, each with the answers so far."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tqdm import tqdm

from loadtest.client import OpenAIClient, RequestResult, first_model
from loadtest.metrics import PERCENTILES, summarize
from loadtest.workload import (
    BudgetMix,
    Conversation,
    LengthDist,
    RequestSpec,
    budget_key,
    conversation_stream,
    request_stream,
    shared_prefix,
)

RESULT_VERSION = 1


@dataclass(frozen=True)
class LoadConfig:
    """Everything a load test run needs; ``concurrency`` (closed loop) or ``rate`` (open loop,
    requests/s) lists the sweep points."""

    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None                 # None: the first of GET /v1/models
    endpoint: str = "completions"            # or "chat"
    stream: bool = True
    concurrency: tuple[int, ...] = (8,)
    rate: tuple[float, ...] = ()             # non-empty: open loop
    num_requests: int | None = 100           # per point; None: until `duration`
    duration_s: float | None = None          # per point; None: until `num_requests`
    warmup: int = 2
    prompt_len: str = "128"
    output_len: str = "64"
    think_budgets: str = "default"
    shared_prefix_len: int = 0               # words of a prefix common to every prompt
    multi_turn: int = 0                      # > 1: conversations of this many turns
    budget_sweep: bool = False               # one point per budget instead of a mix
    ignore_eos: bool = False
    min_think_budget: float | None = None    # sent with every request (elastic thinking)
    slo_ttft_ms: float | None = None         # goodput: requests within both SLOs per second
    slo_itl_ms: float | None = None
    seed: int = 0
    api_key: str | None = None
    timeout_s: float = 300.0
    percentiles: tuple[float, ...] = PERCENTILES
    progress: bool = True

    def __post_init__(self) -> None:
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("bound the run: give num_requests, duration_s or both")
        if not self.rate and not self.concurrency:
            raise ValueError("give at least one concurrency or rate")
        LengthDist.parse(self.prompt_len), LengthDist.parse(self.output_len)  # fail early
        if self.shared_prefix_len < 0 or self.multi_turn < 0:
            raise ValueError("shared_prefix_len and multi_turn must be >= 0")
        if self.multi_turn > 1 and self.rate:
            raise ValueError("multi-turn conversations run closed-loop: give a concurrency")

    @property
    def mode(self) -> str:
        return "open" if self.rate else "closed"


def points(cfg: LoadConfig) -> list[dict]:
    """The sweep: one dict per measurement (label, concurrency or rate, budget mix)."""
    loads = [("rate", r) for r in cfg.rate] or [("concurrency", c) for c in cfg.concurrency]
    mix = BudgetMix.parse(cfg.think_budgets)
    mixes = mix.single() if cfg.budget_sweep else [mix]
    out = []
    for kind, value in loads:
        for m in mixes:
            label = f"{'c' if kind == 'concurrency' else 'rate'}={value:g}"
            if cfg.budget_sweep:
                label += f" b={budget_key(m.budgets[0])}"
            out.append({"label": label, "concurrency": value if kind == "concurrency" else None,
                        "rate": value if kind == "rate" else None, "mix": m})
    return out


class Bounded:
    """Hands out request specs until the count runs out or the deadline passes."""

    def __init__(self, specs: Iterator[RequestSpec], deadline: float | None) -> None:
        self.specs, self.deadline = specs, deadline
        self.pending = next(specs, None)        # one spec of lookahead, for has_more

    @property
    def has_more(self) -> bool:
        return self.pending is not None

    def next(self) -> RequestSpec | None:
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            return None
        spec, self.pending = self.pending, next(self.specs, None)
        return spec


async def closed_loop(client: OpenAIClient, work: Bounded, concurrency: int,
                      bar: tqdm) -> list[RequestResult]:
    results: list[RequestResult] = []

    async def user() -> None:
        while (spec := work.next()) is not None:
            results.append(await client.send(spec))
            bar.update(1)

    await asyncio.gather(*(user() for _ in range(concurrency)))
    return results


async def open_loop(client: OpenAIClient, work: Bounded, rate: float, rng: random.Random,
                    bar: tqdm) -> list[RequestResult]:
    async def one(spec: RequestSpec) -> RequestResult:
        res = await client.send(spec)
        bar.update(1)
        return res

    tasks = []
    while (spec := work.next()) is not None:
        tasks.append(asyncio.create_task(one(spec)))
        if not work.has_more:                            # no idle gap after the last arrival
            break
        await asyncio.sleep(rng.expovariate(rate))      # Poisson process: exponential gaps
    return list(await asyncio.gather(*tasks))


async def conversations_loop(client: OpenAIClient, convs: Iterator[Conversation],
                             concurrency: int, num_requests: int | None,
                             deadline: float | None, bar: tqdm) -> list[RequestResult]:
    """Closed loop over conversations: each user runs one conversation's turns in order (a
    failed turn ends its conversation), then takes the next, until ``num_requests`` turns
    have been sent or the deadline passes."""
    results: list[RequestResult] = []
    sent = 0

    def may_send() -> bool:
        return ((num_requests is None or sent < num_requests)
                and (deadline is None or time.perf_counter() < deadline))

    async def user() -> None:
        nonlocal sent
        while may_send() and (conv := next(convs, None)) is not None:
            for t in range(conv.turns):
                if not may_send():
                    return
                spec = conv.turn(t, sent)
                sent += 1
                res = await client.send(spec)
                results.append(res)
                bar.update(1)
                if not res.success:
                    break
                conv.answers.append(res.text)

    await asyncio.gather(*(user() for _ in range(concurrency)))
    return results


async def measure(cfg: LoadConfig, client: OpenAIClient, point: dict, seed: int) -> dict:
    """Warm-up, then one measurement; returns the point's summary."""
    prompt_len, output_len = LengthDist.parse(cfg.prompt_len), LengthDist.parse(cfg.output_len)
    prefix = shared_prefix(cfg.shared_prefix_len, cfg.seed)
    warm = request_stream(prompt_len, output_len, point["mix"], seed + 7919, cfg.warmup, prefix)
    warm_results = await asyncio.gather(*(client.send(spec) for spec in warm))
    bar = tqdm(total=cfg.num_requests, desc=point["label"], unit="req",
               disable=not cfg.progress, leave=True, dynamic_ncols=True)
    start = time.perf_counter()
    deadline = None if cfg.duration_s is None else start + cfg.duration_s
    if cfg.multi_turn > 1:
        limit = None if cfg.num_requests is None else -(-cfg.num_requests // cfg.multi_turn)
        convs = conversation_stream(cfg.multi_turn, prompt_len, output_len, point["mix"], seed,
                                    limit, prefix)
        results = await conversations_loop(client, convs, point["concurrency"],
                                           cfg.num_requests, deadline, bar)
    elif point["rate"] is not None:
        specs = request_stream(prompt_len, output_len, point["mix"], seed, cfg.num_requests,
                               prefix)
        results = await open_loop(client, Bounded(specs, deadline), point["rate"],
                                  random.Random(seed), bar)
    else:
        specs = request_stream(prompt_len, output_len, point["mix"], seed, cfg.num_requests,
                               prefix)
        results = await closed_loop(client, Bounded(specs, deadline), point["concurrency"], bar)
    duration = time.perf_counter() - start
    bar.close()
    summary = summarize(results, duration, cfg.percentiles, cfg.slo_ttft_ms, cfg.slo_itl_ms)
    mix = point["mix"]
    return {"label": point["label"], "concurrency": point["concurrency"], "rate": point["rate"],
            "think_budgets": {budget_key(b): w for b, w in zip(mix.budgets, mix.weights)},
            # Not in the metrics, but the server counted them: kept so totals can be reconciled.
            "warmup": {"requests": len(warm_results),
                       "failed": sum(not r.success for r in warm_results),
                       "input_tokens": sum(r.prompt_tokens for r in warm_results),
                       "output_tokens": sum(r.output_tokens for r in warm_results)},
            **summary}


async def run_async(cfg: LoadConfig) -> dict:
    model = cfg.model or await first_model(cfg.base_url, cfg.api_key)
    client = OpenAIClient(cfg.base_url, model, cfg.endpoint, cfg.stream, cfg.api_key,
                          cfg.ignore_eos, cfg.timeout_s, min_think_budget=cfg.min_think_budget)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        runs = [await measure(cfg, client, p, cfg.seed + i) for i, p in enumerate(points(cfg))]
    finally:
        await client.aclose()
    config = dataclasses.asdict(cfg)
    config.update(model=model, mode=cfg.mode, api_key=None)     # never write the key out
    return {"version": RESULT_VERSION, "started_at": started, "config": config, "runs": runs}


def run(cfg: LoadConfig) -> dict:
    """Runs every sweep point of ``cfg``; returns the JSON-ready result."""
    return asyncio.run(run_async(cfg))
