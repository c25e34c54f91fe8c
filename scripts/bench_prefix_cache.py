"""Prefix caching on vs off, side by side: four benchmarks on two real servers.

    python scripts/bench_prefix_cache.py [--model default] [--device cpu] [--quick]

Starts ``itt-server`` twice on free ports, one as is (prefix caching on, the default) and one
with ``--no-enable-prefix-caching``, and runs rounds of the four benchmarks, each round on both
servers one after the other (the order alternating between rounds, so drift on a shared
machine hits both alike). Each round draws new prompts (its own seed), so no round reuses
another's prefixes. Prints per benchmark the median over rounds on each server and on/off:

1. Chat with a shared system prompt: requests whose prompts share a 384-word prefix and
   differ in a 32-word suffix, 32 output tokens, concurrency 8 (``python -m loadtest
   --shared-prefix-len 384 --prompt-len 32``): TTFT p50 and total token throughput.
2. lm-eval-style loglikelihood: items of a ~100-word context and 4 continuations of ~8 words,
   each context + continuation one ``/v1/completions`` request with ``echo``, ``logprobs`` 1
   and ``max_tokens`` 1 (lm-eval's loglikelihood requests), 4 items in flight: wall time, and
   the largest difference of a continuation's log-likelihood between the servers.
3. No shared prefix (random prompts of the same length as 1): total token throughput, the
   cost of caching when nothing is shared.
4. Multi-turn: conversations of 6 turns, each re-sending the whole history (``python -m
   loadtest --multi-turn 6``), 32-word messages and 32-token answers: prompt tokens sent, and
   computed (sent - usage.prompt_tokens_details.cached_tokens).

Lengths are in words (about a token each); the real prompt token counts come from ``usage``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loadtest.run import LoadConfig, run_async  # noqa: E402
from loadtest.servers import free_port, stop_process, wait_ready  # noqa: E402
from loadtest.workload import WORDS  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    rounds: int = 3
    chat_requests: int = 64          # benchmarks 1 and 3
    prefix_words: int = 384
    suffix_words: int = 32
    output_tokens: int = 32
    concurrency: int = 8
    ll_items: int = 200              # benchmark 2
    ll_context_words: int = 100
    ll_choices: int = 4
    ll_choice_words: int = 8
    ll_in_flight: int = 4
    conversations: int = 16          # benchmark 4
    turns: int = 6
    turn_words: int = 32


FULL = Sizes()
QUICK = Sizes(rounds=2, chat_requests=16, ll_items=12, conversations=4)


# ---- servers ------------------------------------------------------------------------------
class Server:
    def __init__(self, name: str, model: str, device: str, flags: list[str], log_dir: Path,
                 threads: int | None) -> None:
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("itt-server")
        entry = [exe] if exe else [sys.executable, "-m", "server"]
        cmd = [*entry, "--model", model, "--device", device, "--host", "127.0.0.1",
               "--port", str(self.port), *flags]
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.log = log_dir / f"server-{name}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                         env=env)

    def wait_ready(self, timeout_s: float = 300) -> str:
        """Waits for /health; returns the served model id."""
        wait_ready(self.url + "/health", self.proc, self.log, timeout_s)
        return httpx.get(self.url + "/v1/models", timeout=10).json()["data"][0]["id"]

    def stop(self) -> None:
        stop_process(self.proc)


# ---- the benchmarks -------------------------------------------------------------------------
async def loadtest(url: str, model: str, seed: int, **kw) -> dict:
    kw.setdefault("warmup", 0)
    cfg = LoadConfig(base_url=url, model=model, seed=seed, progress=False, ignore_eos=True,
                     **kw)
    return (await run_async(cfg))["runs"][0]


async def shared_system_prompt(url: str, model: str, sz: Sizes, seed: int) -> dict:
    # One warm-up request computes the system prompt, as a running server would have it.
    run = await loadtest(url, model, seed, concurrency=(sz.concurrency,), warmup=1,
                         num_requests=sz.chat_requests, shared_prefix_len=sz.prefix_words,
                         prompt_len=str(sz.suffix_words), output_len=str(sz.output_tokens))
    return {"ttft_p50_ms": run["ttft_ms"]["median"],
            "total_tok_per_s": run["total_token_throughput"],
            "output_tok_per_s": run["output_throughput"],
            "prompt_tokens": run["total_input_tokens"],
            "cached_tokens": run["total_cached_tokens"], "failed": run["failed"]}


async def random_prompts(url: str, model: str, sz: Sizes, seed: int) -> dict:
    run = await loadtest(url, model, seed, concurrency=(sz.concurrency,), warmup=1,
                         num_requests=sz.chat_requests,
                         prompt_len=str(sz.prefix_words + sz.suffix_words),
                         output_len=str(sz.output_tokens))
    return {"ttft_p50_ms": run["ttft_ms"]["median"],
            "total_tok_per_s": run["total_token_throughput"],
            "prompt_tokens": run["total_input_tokens"],
            "cached_tokens": run["total_cached_tokens"], "failed": run["failed"]}


async def multi_turn(url: str, model: str, sz: Sizes, seed: int) -> dict:
    run = await loadtest(url, model, seed, concurrency=(sz.conversations,),
                         num_requests=sz.conversations * sz.turns, multi_turn=sz.turns,
                         endpoint="chat", prompt_len=str(sz.turn_words),
                         output_len=str(sz.output_tokens))
    sent, cached = run["total_input_tokens"], run["total_cached_tokens"]
    return {"prompt_tokens_sent": sent, "prompt_tokens_computed": sent - cached,
            "cached_tokens": cached, "wall_s": run["duration_s"], "failed": run["failed"]}


def cloze_items(sz: Sizes, seed: int) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    words = lambda n: " ".join(rng.choices(WORDS, k=n))          # noqa: E731
    return [(words(sz.ll_context_words),
             [" " + words(sz.ll_choice_words) for _ in range(sz.ll_choices)])
            for _ in range(sz.ll_items)]


async def loglikelihood(url: str, model: str, sz: Sizes, seed: int,
                        batched: bool = False) -> dict:
    """Each item's continuations as one request each, one after the other (lm-eval's
    ``local-completions`` with batch_size 1), or ``batched``: all of an item's continuations
    in one request with a list ``prompt`` (batch_size = the number of choices)."""
    items = iter(enumerate(cloze_items(sz, seed)))
    scores: dict[tuple[int, int], float] = {}           # (item, choice) -> log-likelihood
    usage = {"prompt_tokens": 0, "cached_tokens": 0}

    def score(choice: dict, start: int) -> float:
        # The continuation's log-likelihood: its echoed tokens (the prompt's tail).
        lp = choice["logprobs"]
        return sum(v for v, off in zip(lp["token_logprobs"][:-1], lp["text_offset"])
                   if v is not None and off >= start)

    async def post(http: httpx.AsyncClient, prompt) -> dict:
        r = await http.post("/v1/completions", json={
            "model": model, "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 1,
            "temperature": 0})
        r.raise_for_status()
        body = r.json()
        usage["prompt_tokens"] += body["usage"]["prompt_tokens"]
        usage["cached_tokens"] += body["usage"]["prompt_tokens_details"]["cached_tokens"]
        return body

    async def worker(http: httpx.AsyncClient) -> None:
        for i, (context, choices) in items:                       # the shared iterator
            if batched:
                body = await post(http, [context + c for c in choices])
                for choice in body["choices"]:
                    scores[i, choice["index"]] = score(choice, len(context))
                continue
            for j, c in enumerate(choices):
                body = await post(http, context + c)
                scores[i, j] = score(body["choices"][0], len(context))

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await asyncio.gather(*(worker(http) for _ in range(sz.ll_in_flight)))
    return {"wall_s": time.perf_counter() - start, **usage, "_scores": scores}


async def loglikelihood_batched(url: str, model: str, sz: Sizes, seed: int) -> dict:
    return await loglikelihood(url, model, sz, seed, batched=True)


BENCHMARKS = {
    "1 shared system prompt": shared_system_prompt,
    "2 loglikelihood (lm-eval)": loglikelihood,
    "2b loglikelihood, batched": loglikelihood_batched,
    "3 random prompts": random_prompts,
    "4 multi-turn": multi_turn,
}
# (metric, how on/off reads): "speedup" = off / on (time: >1 is faster with caching),
# "ratio" = on / off.
REPORT = {
    "1 shared system prompt": [("ttft_p50_ms", "speedup"), ("total_tok_per_s", "ratio"),
                               ("output_tok_per_s", "ratio"), ("prompt_tokens", "ratio"),
                               ("cached_tokens", "ratio")],
    "2 loglikelihood (lm-eval)": [("wall_s", "speedup"), ("prompt_tokens", "ratio"),
                                  ("cached_tokens", "ratio")],
    "2b loglikelihood, batched": [("wall_s", "speedup"), ("prompt_tokens", "ratio"),
                                  ("cached_tokens", "ratio")],
    "3 random prompts": [("total_tok_per_s", "ratio"), ("ttft_p50_ms", "speedup"),
                         ("cached_tokens", "ratio")],
    "4 multi-turn": [("prompt_tokens_sent", "ratio"), ("prompt_tokens_computed", "ratio"),
                     ("cached_tokens", "ratio"), ("wall_s", "speedup")],
}


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def report(results: dict, ll_diff: float) -> str:
    lines = [f"{'benchmark':28} {'metric':24} {'on':>12} {'off':>12}  on/off"]
    for bench, metrics in REPORT.items():
        for name, kind in metrics:
            on = median([r[name] for r in results[bench]["on"]])
            off = median([r[name] for r in results[bench]["off"]])
            if kind == "speedup":
                x = off / on if on else 0.0
                rel = "-" if not x else (f"{x:.2f}x faster" if x >= 1 else
                                         f"{1 / x:.2f}x slower")
            else:
                rel = f"{on / off:.3f}" if off else "-"
            lines.append(f"{bench:28} {name:24} {on:12.1f} {off:12.1f}  {rel}")
    if "4 multi-turn" in results:
        on4 = results["4 multi-turn"]["on"]
        frac = median([r["prompt_tokens_computed"] / r["prompt_tokens_sent"] for r in on4])
        lines.append(f"multi-turn with caching: {frac:.1%} of the prompt tokens sent were "
                     "computed")
    lines.append(f"loglikelihood: largest |on - off| of a continuation's log-likelihood: "
                 f"{ll_diff:.3g}")
    failed = sum(r.get("failed", 0) for b in results.values() for s in b.values() for r in s)
    lines.append(f"failed requests: {failed}")
    return "\n".join(lines)


async def run_rounds(servers: dict[str, tuple[str, str]], sz: Sizes) -> tuple[dict, float]:
    results: dict[str, dict[str, list[dict]]] = {b: {"on": [], "off": []} for b in BENCHMARKS}
    ll_diff = 0.0
    for rnd in range(sz.rounds):
        order = ["on", "off"] if rnd % 2 == 0 else ["off", "on"]
        for bench_no, (bench, fn) in enumerate(BENCHMARKS.items()):
            scores = {}
            for which in order:
                url, model = servers[which]
                t0 = time.perf_counter()
                # Its own seed per round and benchmark: no prompt of one is a prefix of
                # another's (the workloads draw words from the same generator).
                out = await fn(url, model, sz, seed=1000 * rnd + 100 * bench_no + 17)
                scores[which] = out.pop("_scores", None)
                results[bench][which].append(out)
                print(f"round {rnd + 1}/{sz.rounds} {bench} [{which}] "
                      f"{time.perf_counter() - t0:.1f} s: {out}", flush=True)
            if scores["on"] is not None:
                ll_diff = max([ll_diff] + [abs(v - scores["off"][k])
                                           for k, v in scores["on"].items()])
    return results, ll_diff


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true",
                   help=f"a few minutes: {asdict(QUICK)}")
    p.add_argument("--rounds", type=int, help="override the number of rounds")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each server")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra flag for both servers (repeatable), e.g. --server-arg=--seed=0")
    p.add_argument("--out", type=Path, help="write every round's figures here (JSON)")
    p.add_argument("--only", help="comma-separated benchmark numbers to run, e.g. 2,2b")
    args = p.parse_args(argv)
    if args.only:
        keep = set(args.only.split(","))
        for name in list(BENCHMARKS):
            if name.split()[0] not in keep:
                del BENCHMARKS[name], REPORT[name]
    sz = QUICK if args.quick else FULL
    if args.rounds:
        sz = Sizes(**{**asdict(sz), "rounds": args.rounds})
    log_dir = Path(tempfile.mkdtemp(prefix="bench_prefix_cache_"))
    servers = {"on": Server("on", args.model, args.device, list(args.server_arg), log_dir,
                            args.threads),
               "off": Server("off", args.model, args.device,
                             [*args.server_arg, "--no-enable-prefix-caching"], log_dir,
                             args.threads)}
    try:
        ready = {k: (s.url, s.wait_ready()) for k, s in servers.items()}
        print(f"servers up ({log_dir}); sizes {asdict(sz)}", flush=True)
        t0 = time.perf_counter()
        results, ll_diff = asyncio.run(run_rounds(ready, sz))
    finally:
        for s in servers.values():
            s.stop()
    print(f"\n{sz.rounds} rounds in {time.perf_counter() - t0:.0f} s; medians over rounds\n")
    print(report(results, ll_diff))
    if args.out:
        args.out.write_text(json.dumps({"sizes": asdict(sz), "results": results,
                                        "loglikelihood_max_diff": ll_diff}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
