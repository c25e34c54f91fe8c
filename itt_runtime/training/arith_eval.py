"""Exact-match accuracy of arithmetic models per task and digit count, against think budget.

    python -m itt_runtime.training.arith_eval --model arith \\
        --control dense=DIR --control loop=DIR [--n 1000] [--json out.json]

Problems are fresh: the ``eval`` split of training/tasks.py, which no training or calibration
problem falls in. Every model runs in serving mode: the reference forward with causal
threshold routing (ITT_SPEC "Serving and evaluation"). A problem counts as correct when every
answer token and the EOS after it is the greedy choice given the prompt and the correct
answer so far — the same event as greedy generation reproducing the answer exactly, computed
in one forward pass. ``--engine-check K`` also runs the first K problems of each setting
through the real engine (``LLM.generate``, greedy) and reports how many outcomes agree.

Compute per token is the mean number of block applications per real token (prompt and
answer): n_layers plus the routed steps taken; "routed" is that extra divided by its maximum,
the measured counterpart of the budget.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from itt_runtime.model.itt import ThresholdRouting
from itt_runtime.model.loader import load_model
from itt_runtime.training import tasks
from itt_runtime.training.chat_tasks import ChatFormat
from itt_runtime.training.task_trainer import PlainFormat, ProblemFormat, exact_match

BUDGETS = (0.0, 0.25, 0.5, 0.75, 1.0)
SETTINGS = ("add2", "add3", "mul3", "mix")
EVAL_SEED = 0


def parse_setting(s: str) -> tuple[str, int]:
    if s == "mix":
        return "mix", 0
    task, digits = s.rstrip("0123456789"), s[len(s.rstrip("0123456789")):]
    if task not in tasks.TASKS or not digits:
        raise argparse.ArgumentTypeError(f"setting {s!r}: want e.g. add4 or mul3")
    return task, int(digits)


def standard_error(accuracy: float, n: int) -> float:
    """The standard error of an accuracy measured on ``n`` independent problems."""
    return (accuracy * (1 - accuracy) / n) ** 0.5


def threshold_routing(cfg, budget: float):
    """routing_for(lengths, T) of exact_match: causal thresholds at ``budget`` for every row."""
    def route(lengths, T):
        return ThresholdRouting.for_budgets(cfg, [budget] * len(lengths))
    return route


def problem_format(tok, cfg, name: str = "auto") -> ProblemFormat:
    """The format a model was trained on (``auto``: its config's training record; plain when
    it has none), or the one named: ``plain`` or ``chat``."""
    if name == "auto":
        name = cfg.extra.get("_training", {}).get("format", "plain")
    return ChatFormat(tok) if name == "chat" else PlainFormat(tok)


def evaluate_model(path: str, settings: list[tuple[str, int]], budgets: Sequence[float | None],
                   n: int, engine_check: int = 0, fmt_name: str = "auto") -> list[dict]:
    """Rows {setting, budget, accuracy, stderr, problems, blocks_per_token, routed,
    routed_per_step (the fraction at each routed step of each ITT layer)[, engine_agree]}."""
    model, tok = load_model(path)
    cfg = model.cfg
    fmt = problem_format(tok, cfg, fmt_name)
    rows = []
    llm = None
    if not cfg.is_itt:
        budgets = [None]                                   # a dense model has no budget
    for task, digits in settings:
        if task == "mix":         # the held-out problems in the training mix: what was calibrated
            tc = cfg.extra.get("_training", {}).get("train_config", {})
            top = {"add": tc.get("max_add_digits", 3)}
            if tc.get("max_mul_digits"):
                top["mul"] = tc["max_mul_digits"]
            gen = tasks.stream("eval", EVAL_SEED, tasks.curriculum_mix(1.0, top))
            problems = [next(gen) for _ in range(n)]
        else:
            problems = tasks.take("eval", EVAL_SEED, task, digits, n)
        for b in budgets:
            budget = (cfg.default_budget if b is None else b) if cfg.is_itt else None
            route = threshold_routing(cfg, budget) if budget is not None else None
            acc, extra, per_stream = exact_match(model, fmt, problems, route)
            row = {"setting": task if task == "mix" else f"{task}{digits}", "budget": budget,
                   "accuracy": acc, "stderr": standard_error(acc, len(problems)),
                   "problems": len(problems),
                   "blocks_per_token": cfg.n_layers + extra,
                   "routed": extra / cfg.max_extra_steps if cfg.is_itt else None,
                   "routed_per_step": per_stream}
            if engine_check:
                llm = llm or _llm(path)
                row["engine_agree"] = _engine_agreement(model, fmt, llm, problems[:engine_check],
                                                        budget, route)
            rows.append(row)
            print(_line(path.split("/")[-1], row), file=sys.stderr, flush=True)
    return rows


def _llm(path: str):
    from itt_runtime.llm import LLM
    return LLM(model=path, device="cpu", dtype="float32")


def _engine_agreement(model, fmt: ProblemFormat, llm, problems, budget, route) -> str:
    """'agree/total': problems where engine greedy exact match == the forward's verdict."""
    from itt_runtime.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=12, temperature=0.0, think_budget=budget)
    outs = llm.generate([fmt.prompt_ids(p) for p in problems], params)
    agree = 0
    for p, out in zip(problems, outs):
        ref = exact_match(model, fmt, [p], route)[0]
        agree += (out.outputs[0].text == p.answer) == (ref == 1.0)
    return f"{agree}/{len(problems)}"


HEADER = (f"{'model':<8} {'setting':<7} {'budget':>6} {'accuracy ± se':>15} {'blocks/tok':>10} "
          f"{'routed':>7} {'max|step-b|':>11} {'n':>5}")


def _line(name: str, r: dict) -> str:
    b = "-" if r["budget"] is None else f"{r['budget']:.2f}"
    routed = "-" if r["routed"] is None else f"{r['routed']:.3f}"
    dev = "-" if r["budget"] is None or not r["routed_per_step"] else \
        f"{max(abs(f - r['budget']) for f in r['routed_per_step']):.3f}"
    extra = f"  engine {r['engine_agree']}" if "engine_agree" in r else ""
    return (f"{name:<8} {r['setting']:<7} {b:>6} {100 * r['accuracy']:>8.1f}% "
            f"± {100 * r['stderr']:.1f} "
            f"{r['blocks_per_token']:>10.2f} {routed:>7} {dev:>11} {r['problems']:>5}{extra}")


def format_table(results: dict[str, list[dict]]) -> str:
    return "\n".join([HEADER] + [_line(name, r) for name, rows in results.items() for r in rows])


def format_markdown(results: dict[str, list[dict]]) -> str:
    """One row per (model, budget), one accuracy column per setting, compute beside it."""
    settings = list(dict.fromkeys(r["setting"] for r in results["itt"]))
    head = ["model", "budget", "blocks / token (mix)", "routed (mix)", *settings]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in results.items():
        for b in dict.fromkeys(r["budget"] for r in rows):
            sel = {r["setting"]: r for r in rows if r["budget"] == b}
            any_row = sel.get("mix") or next(iter(sel.values()))
            routed = "-" if any_row["routed"] is None else f"{any_row['routed']:.3f}"
            cells = [name, "-" if b is None else f"{b:g}",
                     f"{any_row['blocks_per_token']:.2f}", routed]
            cells += [f"{100 * sel[s]['accuracy']:.1f} % ± {100 * sel[s]['stderr']:.1f}"
                      if s in sel else "" for s in settings]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@torch.no_grad()           # scoped: tests call main() in-process
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m itt_runtime.training.arith_eval",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="arith", help="the ITT model (swept over --budgets)")
    p.add_argument("--control", action="append", default=[], metavar="NAME=DIR",
                   help="a control model: dense (no ITT layers) runs once; an ITT model "
                        "trained at capacity 1 (uniform loop) runs at budget 1")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help=f"comma-separated task+digits (default {','.join(SETTINGS)})")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    p.add_argument("--n", type=int, default=1000, help="problems per setting")
    p.add_argument("--engine-check", type=int, default=0, metavar="K",
                   help="also run K problems per setting and budget through the real engine")
    p.add_argument("--format", choices=["auto", "plain", "chat"], default="auto",
                   help="problem format (auto: what the model was trained on; chat: one user "
                        "turn in the model's chat template, for an instruct model)")
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--markdown", action="store_true", help="print a markdown table instead")
    a = p.parse_args(argv)
    settings = [parse_setting(s) for s in a.settings.split(",") if s]
    budgets = [float(b) for b in a.budgets.split(",")]
    results = {"itt": evaluate_model(a.model, settings, budgets, a.n, a.engine_check, a.format)}
    for spec in a.control:
        name, _, path = spec.partition("=")
        model, _ = load_model(path)
        control_budgets = [1.0] if model.cfg.is_itt else [None]
        results[name] = evaluate_model(path, settings, control_budgets, a.n, a.engine_check,
                                       a.format)
    print(format_markdown(results) if a.markdown else format_table(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
