"""Summary metrics of one measurement, defined as vLLM's `bench serve` defines them
(benchmark_serving.calculate_metrics):

- only successful requests count; failures are reported by status;
- TTFT and E2E over requests; TPOT = (E2E - TTFT) / (output tokens - 1), over requests with more
  than one output token; ITL over all gaps of all requests;
- throughput = totals / duration, where duration runs from the first request sent (after
  warm-up) to the last one finished;
- statistics: mean, median, std and percentiles with numpy's linear interpolation.

Plus, per think budget: the same latencies, the output tokens, and the mean thinking depth
(token-weighted over the budget's requests).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from loadtest.client import RequestResult
from loadtest.workload import budget_key

PERCENTILES = (50, 90, 99)


def stats_ms(values_s: list[float], percentiles=PERCENTILES) -> dict:
    """mean/median/std/pNN in milliseconds; all None when there is no value."""
    keys = ["mean", "median", "std"] + [f"p{p:g}" for p in percentiles]
    if not values_s:
        return dict.fromkeys(keys)
    ms = np.asarray(values_s, dtype=float) * 1000.0
    out = {"mean": float(ms.mean()), "median": float(np.median(ms)), "std": float(ms.std())}
    for p in percentiles:
        out[f"p{p:g}"] = float(np.percentile(ms, p))
    return out


def latencies(ok: list[RequestResult], percentiles=PERCENTILES) -> dict:
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "ttft_ms": stats_ms([r.ttft for r in ok], percentiles),
        "tpot_ms": stats_ms(tpots, percentiles),
        "itl_ms": stats_ms([gap for r in ok for gap in r.itl], percentiles),
        "e2el_ms": stats_ms([r.latency for r in ok], percentiles),
    }


def thinking_depth(ok: list[RequestResult]) -> dict:
    """Token-weighted means of the server-reported per-request thinking depth; falls back to
    the per-token lists when the server sent no usage.thinking."""
    weighted = [(r.mean_extra_steps, r.mean_normalized_depth, r.output_tokens) for r in ok
                if r.mean_extra_steps is not None and r.output_tokens > 0]
    tokens = sum(n for _, _, n in weighted)
    if tokens:
        return {"mean_extra_steps": sum(x * n for x, _, n in weighted) / tokens,
                "mean_normalized_depth":
                    sum((y or 0.0) * n for _, y, n in weighted) / tokens}
    steps = [s for r in ok for s in r.extra_steps]
    return {"mean_extra_steps": float(np.mean(steps)) if steps else None,
            "mean_normalized_depth": None}


def applied_budget(ok: list[RequestResult]) -> float | None:
    """Token-weighted mean of the budgets the server applied (usage.thinking)."""
    weighted = [(r.applied_think_budget, r.output_tokens) for r in ok
                if r.applied_think_budget is not None and r.output_tokens > 0]
    tokens = sum(n for _, n in weighted)
    return sum(b * n for b, n in weighted) / tokens if tokens else None


def meets_slo(r: RequestResult, ttft_ms: float | None, itl_ms: float | None) -> bool:
    """vLLM's goodput rule: the request's TTFT and its time per output token are within."""
    if ttft_ms is not None and r.ttft * 1e3 > ttft_ms:
        return False
    if itl_ms is not None and r.output_tokens > 1 and \
            (r.latency - r.ttft) / (r.output_tokens - 1) * 1e3 > itl_ms:
        return False
    return True


def summarize(results: list[RequestResult], duration_s: float,
              percentiles=PERCENTILES, slo_ttft_ms: float | None = None,
              slo_itl_ms: float | None = None) -> dict:
    """The summary of one measurement (JSON-ready). ``goodput``: completed requests per second
    that met both SLOs (when any is given)."""
    ok = [r for r in results if r.success]
    good = [r for r in ok if meets_slo(r, slo_ttft_ms, slo_itl_ms)]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    summary = {
        "duration_s": duration_s,
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": dict(Counter(r.status for r in results if not r.success)),
        "total_input_tokens": in_tokens,
        # Prompt tokens the server took from its prefix cache instead of computing them.
        "total_cached_tokens": cached,
        "cached_fraction": cached / in_tokens if in_tokens else 0.0,
        "total_output_tokens": out_tokens,
        "counted_output_tokens": sum(r.counted_tokens for r in ok),
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_throughput": out_tokens / duration_s if duration_s > 0 else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s if duration_s > 0
        else 0.0,
        **latencies(ok, percentiles),
        **thinking_depth(ok),
        "mean_applied_think_budget": applied_budget(ok),
        "goodput": (len(good) / duration_s if duration_s > 0 else 0.0)
        if slo_ttft_ms is not None or slo_itl_ms is not None else None,
    }
    per_budget = {}
    for key in sorted({budget_key(r.think_budget) for r in results}):
        mine = [r for r in results if budget_key(r.think_budget) == key]
        mine_ok = [r for r in mine if r.success]
        tokens = sum(r.output_tokens for r in mine_ok)
        per_budget[key] = {
            "think_budget": mine[0].think_budget,
            "requests": len(mine), "completed": len(mine_ok),
            "output_tokens": tokens,
            "output_throughput": tokens / duration_s if duration_s > 0 else 0.0,
            **latencies(mine_ok, percentiles),
            **thinking_depth(mine_ok),
        }
    summary["per_budget"] = per_budget
    return summary
