"""Elastic thinking: the AIMD controller (fast decrease, gradual recovery, a dead band that
settles at constant load, never below zero), and the engine under forced budget changes
mid-sequence with chunked prefill and preemption: the reference model, given the budget the
engine applied at every position, reproduces the engine's greedy tokens and per-token
routing; requests without a range are never touched; bad ranges and flags are refused."""

from __future__ import annotations

import itertools

import pytest
import torch

from itt_runtime.config import ConfigError
from itt_runtime.engine.elastic import (
    DECREASE,
    INCREASE,
    MIN_CHUNK,
    WINDOW_S,
    ElasticController,
)
from itt_runtime.engine.llm_engine import EngineConfig, LLMEngine
from itt_runtime.model.itt import ThresholdRouting
from itt_runtime.model.loader import load_model
from itt_runtime.sampling_params import ParamError, SamplingParams

TINY_POOL = 61 * 4096


# ---- the controller -------------------------------------------------------------------------
def test_controller_decreases_fast_recovers_slowly_and_holds_in_the_dead_band():
    c = ElasticController(target_itl=0.010, target_ttft=None)
    t = 0.0
    c.observe_step(0.030)                         # 3x over the target
    scales = []
    for _ in range(4):
        t += WINDOW_S
        scales.append(c.update(t, 0.0))
    assert scales == pytest.approx([DECREASE ** k for k in range(1, 5)])
    c.itl = 0.009                                 # inside the dead band [0.8, 1]: hold
    held = [c.update(t + WINDOW_S * k, 0.0) for k in range(1, 6)]
    assert held == [scales[-1]] * 5
    c.itl = 0.002                                 # headroom: + INCREASE per window
    t += 10
    up = [c.update(t + WINDOW_S * k, 0.0) for k in range(1, 4)]
    assert up == pytest.approx([scales[-1] + INCREASE * k for k in range(1, 4)])
    assert c.update(t + 1000 * WINDOW_S, 0.0) <= 1.0


def test_controller_changes_at_most_once_per_window_and_floors_at_zero():
    c = ElasticController(target_itl=None, target_ttft=0.1)
    assert c.update(0.0, 1.0) == pytest.approx(DECREASE)   # oldest waiting: 10x the target
    assert c.update(0.01, 1.0) == pytest.approx(DECREASE)  # same window: unchanged
    t = 0.0
    for _ in range(40):
        t += WINDOW_S
        c.update(t, 1.0)
    assert c.scale == 0.0                          # targets unreachable: everyone at the floor


def test_controller_settles_without_oscillating_on_a_simulated_server():
    """Step time = 4 ms + 16 ms x scale (budget 1 costs 5x budget 0), target 12 ms: the
    equilibrium scale is 0.5. After the transient the scale stays put."""
    c = ElasticController(target_itl=0.012, target_ttft=None)
    t, history = 0.0, []
    for _ in range(4000):                           # 20 ms steps, 80 s
        c.observe_step(0.004 + 0.016 * c.scale)
        t += 0.02
        history.append(c.update(t, 0.0))
    late = history[-1000:]
    assert max(late) - min(late) == 0.0
    assert 0.004 + 0.016 * late[-1] <= 0.012                   # the target is held
    assert 0.004 + 0.016 * late[-1] >= 0.8 * 0.012 - 0.016 * INCREASE   # not over-throttled


def test_the_itl_signal_is_a_tail_quantile_of_the_steps_since_the_last_change():
    c = ElasticController(target_itl=0.050, target_ttft=None)
    for _ in range(19):
        c.observe_step(0.010)
    c.observe_step(0.100)                          # one slow step in 20: below the p90
    assert c.itl == pytest.approx(0.010)
    c.observe_step(0.100)
    c.observe_step(0.100)                          # three in 22: the p90 is slow
    assert c.itl == pytest.approx(0.100)
    assert c.update(WINDOW_S, 0.0) == pytest.approx(DECREASE)
    c.observe_step(0.020)                          # only steps after the change count
    assert c.itl == pytest.approx(0.020)


def test_prompt_tokens_per_step_are_capped_to_fit_the_itl_target():
    c = ElasticController(target_itl=0.050, target_ttft=None)
    assert c.prefill_cap() is None                 # nothing measured yet
    for _ in range(5):
        c.observe_step(0.010)                      # decode-only steps: 10 ms
        c.observe_step(0.042, prompt_tokens=64)    # + 0.5 ms per prompt token
    # 0.8 x 50 ms leaves 30 ms after the decode rows: 60 prompt tokens.
    assert c.prefill_cap() == 60
    for _ in range(30):
        c.observe_step(0.045)                      # decode alone near the target
    assert c.prefill_cap() == MIN_CHUNK            # prompts still progress
    assert ElasticController(target_itl=None, target_ttft=1.0).prefill_cap() is None


def test_a_prompt_cap_chunks_prompts_but_never_decode_rows(tiny_model_dir):
    """With a cap, a long prompt arriving while others decode is computed in chunks of at
    most the cap, every decode row is still served every step, and outputs are unchanged."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    prompts = [list(range(5, 15)), list(range(20, 90)), list(range(100, 160))]

    def run(cap):
        # Speculation off: a decoding row is one token here (verify rows: test_speculative).
        engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), speculative_config="off"))
        engine.scheduler.prefill_token_cap = cap
        engine.add_request("r0", prompts[0], params)
        outs: dict = {}
        for step in itertools.count():
            if step == 2:
                engine.add_request("r1", prompts[1], params)
                engine.add_request("r2", prompts[2], params)
            plan = engine.scheduler.schedule()
            if not plan.scheduled:
                break
            if cap is not None:
                chunk = sum(s.num_new_tokens for s in plan.scheduled if s.num_new_tokens > 1)
                assert chunk <= cap
                assert all(s.num_new_tokens == 1 for s in plan.scheduled
                           if s.seq.output_token_ids)               # decode rows: one each
            decoding = {s.request_id for s in engine.scheduler.running if s.output_token_ids}
            assert decoding <= {s.seq.request_id for s in plan.scheduled}
            for out in engine._update(plan, engine.runner.execute_model(plan)):
                c = out.outputs[0]
                toks, lps = outs.get(out.request_id, ([], []))
                outs[out.request_id] = (toks + c.token_ids, lps + (c.logprobs or []))
        return outs, step

    free, free_steps = run(None)
    capped, capped_steps = run(16)
    assert capped_steps > free_steps                   # the prompts took more steps
    for rid, (toks, lps) in free.items():
        assert capped[rid][0] == toks
        for a, b in zip(capped[rid][1], lps):
            assert a.keys() == b.keys() and max(abs(a[t] - b[t]) for t in b) <= 1e-4


# ---- the engine -----------------------------------------------------------------------------
def scripted(engine: LLMEngine, scales) -> None:
    """Replace the controller's decisions by a script: the next scale every other step."""
    steps = itertools.count()
    script = itertools.cycle(scales)
    current = [next(script)]

    def update(now, oldest):
        if next(steps) % 2 == 0:
            current[0] = next(script)
        engine.controller.scale = current[0]
        return current[0]
    engine.controller.update = update


@pytest.mark.parametrize("config", [
    dict(max_num_batched_tokens=16),                              # chunked prefill
    dict(max_num_batched_tokens=64, kv_cache_memory=TINY_POOL),   # preemption
], ids=["chunked", "tiny-pool"])
def test_elastic_runs_replay_exactly_in_the_reference(tiny_model_dir, config):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), elastic_thinking=True,
                                    target_itl_ms=10.0, **config))
    scripted(engine, [1.0, 0.5, 0.0, 0.25, 0.75])
    tok = engine.tokenizer
    text = ("In the beginning God created the heaven and the earth. And the earth was "
            "without form, and void; and darkness was upon the face of the deep.")
    prompts = [tok.encode(text)[:n] for n in (9, 23, 40, 57, 33, 61, 18, 50)]
    seqs = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=24, temperature=0.0,
                                                      ignore_eos=True, think_budget=1.0,
                                                      min_think_budget=0.0))
        seqs[f"r{i}"] = engine.requests[f"r{i}"].seqs[0]
    while engine.has_unfinished():
        engine.step()
    if "kv_cache_memory" in config:
        assert engine.scheduler.num_preemptions > 0
    model, _ = load_model(tiny_model_dir)
    changed = 0
    for rid, seq in seqs.items():
        tokens = seq.prompt_token_ids + seq.output_token_ids[:-1]
        budgets = seq.position_budgets
        assert len(budgets) == len(tokens)
        changed += len(set(budgets)) > 1
        with torch.no_grad():
            out = model(torch.tensor([tokens]),
                        routing=ThresholdRouting.for_position_budgets(model.cfg, [budgets]))
        n_prompt = len(seq.prompt_token_ids)
        greedy = out.logits[0, n_prompt - 1:].argmax(-1).tolist()
        assert greedy == seq.output_token_ids, f"{rid}: tokens differ from the replay"
        assert out.extra_steps[0, n_prompt - 1:].tolist() == seq.extra_steps, \
            f"{rid}: per-token routing differs from the replay"
        assert seq.applied_budgets == budgets[n_prompt - 1:]
    assert changed >= len(seqs) // 2, "the script was meant to change budgets mid-sequence"


def test_prompt_steps_are_floored_only_when_their_measured_stall_misses_the_target():
    c = ElasticController(target_itl=0.100, target_ttft=None)
    assert not c.floor_prompt_steps()              # nothing measured: measure one first
    c.observe_step(0.010)                          # decode steps: 10 ms
    c.observe_step(0.070, prompt_tokens=48, unfloored_stall=True)    # a 60 ms stall
    assert c.prompt_stall == pytest.approx(0.060)
    assert not c.floor_prompt_steps()              # 10 + 60 ms fit in 0.8 x 100 ms
    c.observe_step(0.015, prompt_tokens=48)        # a floored one teaches no stall
    assert c.prompt_stall == pytest.approx(0.060)
    for _ in range(10):
        c.observe_step(0.030)                      # load: decode steps near 30 ms
    assert c.floor_prompt_steps()                  # 30 + 60 ms would miss 80
    for _ in range(20):
        c.observe_step(0.010)                      # the load passed
    assert not c.floor_prompt_steps()
    assert not ElasticController(target_itl=None, target_ttft=1.0).floor_prompt_steps()


@pytest.mark.parametrize("stall_s", [2.0, None])
def test_prompt_steps_beside_decoding_requests_run_elastic_rows_at_their_floor(
        tiny_model_dir, stall_s):
    """With an ITL target, a step that computes a prompt while others decode runs the
    elastic requests of that step at their floor, whatever the scale, once a measured stall
    says it would miss the target (here: 2 s against 0.8 x 1 s); a prompt step with nobody
    decoding, and requests without a range, keep their budgets. With no stall measured yet
    (None) the step runs at its budgets and measures one, here well inside the target."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), elastic_thinking=True,
                                    target_itl_ms=1000.0))
    scripted(engine, [1.0])                          # the scale itself never drops
    if stall_s is not None:
        engine.controller.observe_step(0.010)
        # Too few prompt tokens (< MIN_COST_TOKENS) to teach a per-token cost: no cap.
        engine.controller.observe_step(stall_s, prompt_tokens=4, unfloored_stall=True)
    ranged = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, think_budget=1.0,
                            min_think_budget=0.25)
    fixed = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, think_budget=1.0)
    ids = engine.tokenizer.encode("In the beginning God created the heaven and the earth.")
    seqs = {}
    other = engine.tokenizer.encode("And the earth was without form, and void.")
    for rid, params, prompt in (("first", ranged, ids), ("fixed", fixed, other)):
        engine.add_request(rid, prompt, params)
        seqs[rid] = engine.requests[rid].seqs[0]
    engine.step()                            # both prompts, nobody decoding: full budgets
    engine.step()                            # both decode
    engine.add_request("late", ids[:7], ranged)
    seqs["late"] = engine.requests["late"].seqs[0]
    engine.step()                            # the late prompt beside two decoding requests
    while engine.has_unfinished():
        engine.step()
    n = len(ids)
    fixed_seq = seqs["fixed"]                # no range: its budget is never recorded or moved
    assert set(fixed_seq.position_budgets) <= {1.0} and fixed_seq.think_budget == 1.0
    assert not fixed_seq.budget_changed
    if stall_s is not None:
        assert seqs["first"].position_budgets == [1.0] * (n + 1) + [0.25, 1.0]
        assert seqs["late"].position_budgets == [0.25] * 7 + [1.0] * 3
        assert engine.controller.reduced_steps == 1
    else:
        assert seqs["first"].position_budgets == [1.0] * (n + 3)
        assert seqs["late"].position_budgets == [1.0] * 10
        assert engine.controller.reduced_steps == 0
        assert 0 < engine.controller.prompt_stall < 0.8


def test_requests_without_a_range_are_never_touched(tiny_model_dir):
    def run(elastic: bool):
        engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), max_num_batched_tokens=24,
                                        elastic_thinking=elastic,
                                        target_itl_ms=10.0 if elastic else None))
        if elastic:
            scripted(engine, [0.0, 0.5])
        ids = engine.tokenizer.encode("And God said, Let there be light")
        fixed = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True,
                               think_budget=0.6)
        ranged = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True,
                                think_budget=1.0, min_think_budget=0.0)
        engine.add_request("fixed", ids, fixed)
        engine.add_request("ranged", ids, ranged)
        got: dict = {}
        while engine.has_unfinished():
            for out in engine.step():
                c = out.outputs[0]
                toks, think, applied = got.get(out.request_id, ([], [], []))
                got[out.request_id] = (toks + c.token_ids, think + c.thinking,
                                       applied + c.applied_think_budgets)
        return got
    on, off = run(True), run(False)
    assert on["fixed"] == off["fixed"]
    assert set(on["fixed"][2]) == {0.6}
    assert min(on["ranged"][2]) == 0.0 and set(off["ranged"][2]) == {1.0}


def test_bad_ranges_and_flags_are_refused(tiny_model_dir):
    with pytest.raises(ParamError) as e:
        SamplingParams(think_budget=0.3, min_think_budget=0.5)
    assert e.value.param == "min_think_budget"
    with pytest.raises(ParamError) as e:
        SamplingParams(min_think_budget=1.5)
    assert e.value.param == "min_think_budget"
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), default_think_budget=0.4))
    with pytest.raises(ParamError) as e:                 # only the floor, above the default
        engine.add_request("x", [1, 5], SamplingParams(min_think_budget=0.5))
    assert e.value.param == "min_think_budget" and not engine.has_unfinished()
    for bad in (dict(target_itl_ms=10.0), dict(elastic_thinking=True),
                dict(elastic_thinking=True, target_ttft_ms=-5.0)):
        with pytest.raises(ConfigError):
            EngineConfig(**bad)
