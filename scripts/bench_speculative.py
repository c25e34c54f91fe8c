"""Self-speculative decoding against plain decoding, side by side in one process.

Two engines on the same model (plain, and ``speculative_config`` itt_self with k drafted
tokens) generate the same greedy continuations of held-out prompts; rounds alternate A/B and
the medians are reported, with the speed ratio, the acceptance rate and the tokens per verify
step. Greedy outputs are checked identical on the way (``--temperature`` above 0: seeded
sampling, whose outputs differ by design).

The cost model (a second table): per engine step, the plain engine's forward t1 and the rest
of its step o (scheduling, sampling, output); the speculative engine's draft steps t0 each
and its verify step tv (the forward of k + 1 rows a sequence, with acceptance), plus its own
rest. With E tokens per verify step the speculative engine should run at
E·(t1 + o) / (k·t0 + tv + o_spec) times the plain one: "model" beside "measured" says how
well the parts account for the whole, and "if tv = t1" is the ratio a device on which
verifying k + 1 tokens costs one decode step (a GPU) would reach with these drafts.

    python scripts/bench_speculative.py --budgets 1,0.6 --concurrency 1,4 --k 2,4,6
    python scripts/bench_speculative.py --model arith --prompts arith --budgets 1 --k 2,4

``--prompts arith`` asks fresh 3-digit sums (the generator's eval split, the arith model's
format ``"954+124="``) instead of held-out text, and lets every answer end at its EOS
(``--tokens`` is then only the cap): the arith model's answers are four or five tokens, and
past them it has nothing to say.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from itt_runtime.engine.config import AUTO_SPECULATION
from itt_runtime.llm import LLM
from itt_runtime.sampling_params import SamplingParams
from itt_runtime.training import tasks

HELDOUT = Path(__file__).resolve().parent.parent / "data" / "heldout.txt"


def prompts(llm: LLM, kind: str, n: int, length: int) -> list[list[int]]:
    tok = llm.engine.tokenizer
    if kind == "arith":
        return [tok.encode(p.prompt) for p in tasks.take("eval", 0, "add", 3, n)]
    lines = [ln for ln in HELDOUT.read_text().splitlines() if len(ln.split()) > 12]
    return [tok.encode(line)[:length] for line in lines[:n]]


def timed(llm: LLM, batches: list[list[list[int]]],
          params: SamplingParams) -> tuple[float, list]:
    """Tokens per second over ``batches`` generated one after another, and the outputs."""
    out = []
    start = time.perf_counter()
    for batch in batches:
        out += llm.generate(batch, params)
    seconds = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in out) / seconds, out


class StepClock:
    """Wall time an engine spends in its steps, in its runner's forwards, and in draft
    phases (time.perf_counter around the methods, installed on the instances)."""

    def __init__(self, llm: LLM) -> None:
        self.seconds = {"step": 0.0, "execute": 0.0, "draft": 0.0}
        self.steps = 0
        engine, runner = llm.engine, llm.engine.runner
        self._wrap(engine, "step", "step", count=True)
        self._wrap(runner, "execute_model", "execute")
        self._wrap(runner, "_draft", "draft")

    def _wrap(self, obj, method: str, key: str, count: bool = False) -> None:
        inner = getattr(obj, method)

        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start
                self.steps += count

        setattr(obj, method, timed_call)

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.steps = 0


def cost_row(plain: StepClock, spec: StepClock, k: int, drafts: int,
             tokens_per_verify: float, measured: float) -> str:
    """The cost model's line (module docstring) from one point's clocks, times in ms."""
    t1 = plain.seconds["execute"] / plain.steps
    o = (plain.seconds["step"] - plain.seconds["execute"]) / plain.steps
    t0 = spec.seconds["draft"] / (k * drafts)
    tv = (spec.seconds["execute"] - spec.seconds["draft"]) / drafts
    o_spec = (spec.seconds["step"] - spec.seconds["execute"]) / spec.steps
    model = tokens_per_verify * (t1 + o) / (k * t0 + tv + o_spec)
    ceiling = tokens_per_verify * (t1 + o) / (k * t0 + t1 + o_spec)
    return (f"| {t1 * 1e3:.2f} | {o * 1e3:.2f} | {t0 * 1e3:.2f} | {tv * 1e3:.2f} | "
            f"{t0 / t1:.2f} | {tv / t1:.2f} | {model:.2f} | {measured:.2f} | {ceiling:.2f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--budgets", default="1,0.6")
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--k", default="4", help="drafted tokens per step, comma-separated; "
                   "'auto': the engine's default (--speculative-config auto)")
    p.add_argument("--tokens", type=int, default=64, help="generated tokens per sequence")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--prompts", default="text", choices=["text", "arith"],
                   help="held-out text, or fresh 3-digit sums ending at EOS (module docstring)")
    p.add_argument("--problems", type=int, default=32,
                   help="--prompts arith: sums per stream, asked one batch after another")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="above 0: seeded sampling (outputs then differ, not checked)")
    p.add_argument("--compile", default="off", choices=["off", "on"],
                   help="both engines' decode steps (and so the drafts) compiled")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    common = dict(device="cpu", compile=a.compile)
    plain = LLM(a.model, **common, speculative_config="off")     # not "auto"'s default
    specs = {k: LLM(a.model, **common) if k == "auto" else LLM(a.model, **common,
                speculative_config={"method": "itt_self", "num_speculative_tokens": int(k)})
             for k in a.k.split(",")}
    for llm in (plain, *specs.values()):
        llm.engine.runner.warm_up()
    clocks = {id(llm): StepClock(llm) for llm in (plain, *specs.values())}
    costs = []
    shape = (f"{a.problems} fresh 3-digit sums a stream, at most {a.tokens} tokens each"
             if a.prompts == "arith" else
             f"{a.tokens} tokens per sequence, {a.prompt_len}-token prompts")
    print(f"model {a.model}, {a.threads} thread(s), compile {a.compile}, {shape}, "
          f"{a.rounds} interleaved rounds, temperature {a.temperature}")
    print("| budget | streams | k | plain tok/s | speculative tok/s | ratio | acceptance "
          "| tokens / verify |")
    print("|---|---|---|---|---|---|---|---|")
    for budget in map(float, a.budgets.split(",")):
        params = SamplingParams(max_tokens=a.tokens, temperature=a.temperature, seed=0,
                                think_budget=budget, ignore_eos=a.prompts == "text")
        for c in map(int, a.concurrency.split(",")):
            if a.prompts == "arith":
                sums = prompts(plain, "arith", c * a.problems, a.prompt_len)
                batch = [sums[i:i + c] for i in range(0, len(sums), c)]
            else:
                batch = [prompts(plain, "text", c, a.prompt_len)]
            timed(plain, batch, params)                       # warm-up
            for k, spec in specs.items():
                timed(spec, batch, params)
                before = spec.engine.stats()
                clocks[id(plain)].reset()
                clocks[id(spec)].reset()
                base, fast = [], []
                for _ in range(a.rounds):
                    rate, want = timed(plain, batch, params)
                    base.append(rate)
                    rate, got = timed(spec, batch, params)
                    fast.append(rate)
                    assert a.temperature > 0 or [o.outputs[0].token_ids for o in got] == \
                        [o.outputs[0].token_ids for o in want], "outputs differ"
                after = spec.engine.stats()
                drafted = after.spec_num_draft_tokens - before.spec_num_draft_tokens
                accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
                drafts = after.spec_num_drafts - before.spec_num_drafts
                b, f = statistics.median(base), statistics.median(fast)
                print(f"| {budget} | {c} | {k} | {b:.1f} | {f:.1f} | {f / b:.2f} | "
                      f"{accepted / max(drafted, 1):.3f} | {1 + accepted / max(drafts, 1):.2f} |",
                      flush=True)
                if c == 1 and drafts:   # one stream: a step is one row's draft and verify
                    drafted_k = AUTO_SPECULATION.num_speculative_tokens if k == "auto" \
                        else int(k)
                    costs.append(f"| {budget} | {k} " + cost_row(
                        clocks[id(plain)], clocks[id(spec)], drafted_k, drafts,
                        1 + accepted / drafts, f / b))
    if costs:
        print("\nCost model at one stream (ms per step; module docstring):\n")
        print("| budget | k | t1 | o | t0 | tv | t0/t1 | tv/t1 | model | measured "
              "| if tv = t1 |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(costs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
