"""Synthetic multi-step arithmetic: a deterministic, seeded, streaming problem generator.

Prompt formats (fixed; docs/MODEL_CARD_ARITH.md):
  add   "{a}+{b}="   answer: a+b in plain decimal, most significant digit first, then EOS
  mul   "{a}*{b}="   a has ``digits`` digits, b is one digit 2…9; answer a*b, then EOS

The problem space is split three ways by a hash of the prompt text (train / calib / eval), so
an evaluation problem is never a training problem, even for 1-digit sums where the whole space
is seen many times. Streams never end; the same (split, seed, mix) gives the same problems.

Usage: python -m itt_runtime.training.tasks [--split eval] [--seed 0] [--task add] \
           [--digits 4] [-n 10] [--jsonl]   one "prompt answer" line (or JSON object) per problem
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

TASKS = ("add", "mul")
SPLITS = ("train", "calib", "eval")
CHARS = "0123456789+*="                # the whole alphabet of prompts and answers
_BUCKETS = 20                          # crc32(prompt) % 20: 0 -> eval, 1 -> calib, else train


@dataclass(frozen=True)
class Problem:
    task: str
    digits: int
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return self.prompt + self.answer


OPERATORS = {"add": "+", "mul": "*"}


def question(problem: Problem) -> str:
    """The problem as a chat question: "4821+397=" → "What is 4821 + 397?"."""
    op = OPERATORS[problem.task]
    a, b = problem.prompt.removesuffix("=").split(op)
    return f"What is {a} {op} {b}?"


def split_of(prompt: str) -> str:
    bucket = zlib.crc32(prompt.encode()) % _BUCKETS
    return "eval" if bucket == 0 else "calib" if bucket == 1 else "train"


def _number(rng: random.Random, digits: int) -> int:
    """A uniform number with exactly ``digits`` digits (1 digit: 0…9)."""
    if digits == 1:
        return rng.randrange(10)
    return rng.randrange(10 ** (digits - 1), 10 ** digits)


def make(task: str, digits: int, rng: random.Random, mixed: bool = False) -> Problem:
    """One problem. ``mixed`` (training): one addend has fewer digits a quarter of the time,
    so prompts like "4821+397=" occur; evaluation uses two ``digits``-digit addends."""
    if task == "add":
        a = _number(rng, digits)
        db = rng.randint(1, digits - 1) if mixed and digits > 1 and rng.random() < 0.25 else digits
        b = _number(rng, db)
        if mixed and rng.random() < 0.5:
            a, b = b, a
        return Problem("add", digits, f"{a}+{b}=", str(a + b))
    if task == "mul":
        a, b = _number(rng, digits), rng.randint(2, 9)
        return Problem("mul", digits, f"{a}*{b}=", str(a * b))
    raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")


def stream(split: str, seed: int, mix: dict[tuple[str, int], float],
           mixed: bool | None = None) -> Iterator[Problem]:
    """Endless problems of ``split`` drawn from ``mix`` {(task, digits): weight}."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    if mixed is None:
        mixed = split == "train"
    rng = random.Random(f"{split}/{seed}")
    keys = sorted(mix)
    weights = [mix[k] for k in keys]
    while True:
        task, digits = rng.choices(keys, weights)[0]
        p = make(task, digits, rng, mixed)
        if split_of(p.prompt) == split:
            yield p


def _all(task: str, digits: int) -> Iterator[Problem]:
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    for a in range(lo, 10 ** digits):
        for b in (range(lo, 10 ** digits) if task == "add" else range(2, 10)):
            yield Problem(task, digits, f"{a}{'+' if task == 'add' else '*'}{b}=",
                          str(a + b if task == "add" else a * b))


def take(split: str, seed: int, task: str, digits: int, n: int) -> list[Problem]:
    """``n`` distinct problems of one (task, digits) setting, or all of the split's share of
    that setting where it is smaller (e.g. 1-digit sums)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    if digits <= 2 or (task == "mul" and digits <= 4):       # small space: enumerate it
        pool = [p for p in _all(task, digits) if split_of(p.prompt) == split]
        random.Random(f"{split}/{seed}/{task}{digits}").shuffle(pool)
        return pool[:n]
    seen: dict[str, Problem] = {}
    for p in stream(split, seed, {(task, digits): 1.0}, mixed=False):
        seen.setdefault(p.prompt, p)
        if len(seen) >= n:
            break
    return list(seen.values())


def curriculum_mix(progress: float, max_digits: dict[str, int]) -> dict[tuple[str, int], float]:
    """Training mix at ``progress`` ∈ [0, 1]: digit counts open up over the first half of
    training (the largest count is available from 50% on); open counts are weighted by their
    digit count, so the hard settings get most of the problems once they are in."""
    mix = {}
    for task, top in max_digits.items():
        open_to = max(1, min(top, 1 + int(progress * 2 * top)))
        for d in range(1, open_to + 1):
            mix[(task, d)] = d * (0.25 if task == "mul" else 1.0)
    return mix


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m itt_runtime.training.tasks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", choices=SPLITS, default="eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", choices=TASKS, default="add")
    p.add_argument("--digits", type=int, default=4)
    p.add_argument("-n", type=int, default=10)
    p.add_argument("--jsonl", action="store_true",
                   help='one {"prompt", "question", "answer", "task", "digits"} object per line')
    a = p.parse_args(argv)
    for prob in take(a.split, a.seed, a.task, a.digits, a.n):
        if a.jsonl:
            print(json.dumps({"prompt": prob.prompt, "question": question(prob),
                              "answer": prob.answer, "task": prob.task,
                              "digits": prob.digits}))
        else:
            print(prob.prompt, prob.answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
