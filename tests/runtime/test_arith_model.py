"""The shipped `arith` model: loads by name, the engine reproduces the reference on it (greedy
tokens and per-token thinking depth, batched with other budgets), its routing is budget-honest
on held-out problems, and the think budget buys accuracy (docs/MODEL_CARD_ARITH.md)."""

from __future__ import annotations

import pytest
import torch
from itt_testing import reference_greedy

from itt_runtime.checkpoints import resolve_model_path
from itt_runtime.llm import LLM
from itt_runtime.model.itt import ThresholdRouting
from itt_runtime.model.loader import load_model
from itt_runtime.sampling_params import SamplingParams
from itt_runtime.training import tasks
from itt_runtime.training.task_trainer import PlainFormat, exact_match

ARITH = resolve_model_path("arith")
pytestmark = pytest.mark.skipif(not (ARITH / "model.safetensors").exists(),
                                reason="the arith model has not been shipped yet")
BUDGETS = [0.0, 0.25, 0.5, 1.0]


@pytest.fixture(scope="module")
def arith():
    return load_model("arith")


@pytest.fixture(scope="module")
def llm():
    return LLM(model="arith", device="cpu", dtype="float32", max_num_batched_tokens=16)


def test_loads_by_name_as_a_calibrated_itt_model(arith):
    model, tok = arith
    cfg = model.cfg
    assert cfg.is_itt and cfg.calibration is not None and cfg.think_steps == 4
    assert cfg.itt_layers == tuple(range(1, cfg.n_layers, 2))
    assert tok.vocab_size == len(tasks.CHARS) + 3
    assert sum(f.stat().st_size for f in ARITH.iterdir()) < 8 * 2**20


def test_engine_matches_reference(arith, llm):
    """Mixed budgets in one batch, chunked prefill of 16 tokens: the same tokens and thinking
    depth as the reference's full recomputation with causal threshold routing."""
    model, tok = arith
    problems = tasks.take("eval", 7, "add", 3, 3) + tasks.take("eval", 7, "mul", 3, 2)
    cases = [(p, b) for p in problems for b in BUDGETS]
    outs = llm.generate([p.prompt for p, _ in cases],
                        [SamplingParams(max_tokens=6, temperature=0.0, think_budget=b,
                                        ignore_eos=True) for _, b in cases])
    for out, (p, b) in zip(outs, cases):
        tokens, extra, _ = reference_greedy(model, tok.encode(p.prompt), b, 6)
        got = out.outputs[0]
        assert got.token_ids == tokens, f"{p.prompt} budget {b}"
        assert got.thinking == extra, f"{p.prompt} budget {b}"


def test_greedy_answers_are_digits_then_eos(llm):
    outs = llm.generate(["4821+397=", "12+34="], SamplingParams(max_tokens=8, temperature=0.0,
                                                                think_budget=1.0))
    for out in outs:
        assert out.outputs[0].text.isdigit() and out.outputs[0].finish_reason == "stop"


@pytest.mark.parametrize("budget", [0.25, 0.5, 0.75])
def test_routed_fraction_is_within_005_of_budget_on_held_out_problems(arith, budget):
    model, tok = arith
    gen = tasks.stream("eval", 0, tasks.curriculum_mix(1.0, {"add": 3, "mul": 3}))
    problems = [next(gen) for _ in range(500)]
    route = lambda lengths, T: ThresholdRouting.for_budgets(model.cfg, [budget] * len(lengths))  # noqa: E731
    with torch.no_grad():
        _, _, per_step = exact_match(model, PlainFormat(tok), problems, route)
    assert max(abs(f - budget) for f in per_step) <= 0.05, per_step


def test_full_budget_beats_no_budget_on_3_digit_sums(arith):
    model, tok = arith
    problems = tasks.take("eval", 0, "add", 3, 300)
    acc = {}
    for b in (0.0, 1.0):
        route = lambda lengths, T, b=b: ThresholdRouting.for_budgets(model.cfg, [b] * len(lengths))  # noqa: E731
        acc[b] = exact_match(model, PlainFormat(tok), problems, route)[0]
    assert acc[1.0] > acc[0.0], acc
