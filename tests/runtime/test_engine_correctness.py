"""The engine reproduces the reference model (ITT_SPEC "Ground truth"): greedy tokens, logits
and per-token routing, alone or batched with other budgets, with chunked prefill on and off,
and through preemption. fp32 on CPU."""

from __future__ import annotations

import random

import pytest
import torch

from itt_runtime.llm import LLM
from itt_runtime.model.itt import ThresholdRouting
from itt_runtime.model.loader import load_model
from itt_runtime.sampling_params import SamplingParams

from itt_testing import HELDOUT

BUDGETS = [0.0, 0.25, 0.5, 1.0]
MAX_NEW = 6


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    return model, tok


@pytest.fixture(scope="module")
def prompts(reference):
    """20 prompts of varied lengths (1 … ~120 tokens) from the held-out text."""
    _, tok = reference
    lines = [ln for ln in HELDOUT.read_text().splitlines() if ln.strip()]
    rng = random.Random(0)
    out = [[tok.bos_token_id]]                                     # a one-token prompt
    for line in rng.sample(lines, 40):
        ids = tok.encode(line)
        if len(out) < 20 and len(ids) >= 2:
            out.append(ids[: rng.randint(2, min(len(ids), 120))])
    assert len(out) == 20
    return out


@torch.no_grad()
def reference_greedy(model, ids, budget, n):
    """Greedy decode by recomputing the full sequence (no cache). Returns (tokens, extra
    steps of the position that produced each token, logits of each step)."""
    ids, extra, logits = list(ids), [], []
    for _ in range(n):
        out = model(torch.tensor([ids]), routing=ThresholdRouting.for_budgets(model.cfg, [budget]))
        logits.append(out.logits[0, -1])
        ids.append(int(out.logits[0, -1].argmax()))
        extra.append(int(out.routed[0, -1].sum()))
    return ids[-n:], extra, logits


@pytest.fixture(scope="module")
def expected(reference, prompts):
    model, _ = reference
    return {(i, b): reference_greedy(model, p, b, MAX_NEW)
            for i, p in enumerate(prompts) for b in BUDGETS}


def greedy(budget):
    return SamplingParams(max_tokens=MAX_NEW, temperature=0.0, think_budget=budget,
                          ignore_eos=True)


def check(outs, cases, expected):
    for out, (i, b) in zip(outs, cases):
        tokens, extra, _ = expected[(i, b)]
        got = out.outputs[0]
        assert got.token_ids == tokens, f"prompt {i} budget {b}: tokens differ"
        assert got.thinking == extra, f"prompt {i} budget {b}: thinking depth differs"
        assert got.finish_reason == "length"


ENGINES = {
    "chunked-small-budget": dict(max_num_batched_tokens=16),
    "no-chunking": dict(max_num_batched_tokens=512, enable_chunked_prefill=False),
    "tiny-pool": dict(max_num_batched_tokens=64, kv_cache_memory=60 * 4096),
}


@pytest.mark.parametrize("name", list(ENGINES))
def test_mixed_batch_matches_reference(name, tiny_model_dir, prompts, expected):
    llm = LLM(str(tiny_model_dir), **ENGINES[name])
    cases = [(i, b) for i in range(len(prompts)) for b in BUDGETS]
    random.Random(1).shuffle(cases)                               # budgets interleaved
    outs = llm.generate([prompts[i] for i, _ in cases], [greedy(b) for _, b in cases])
    check(outs, cases, expected)
    if name == "tiny-pool":
        assert llm.engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert llm.engine.kv.pool.num_free == llm.engine.kv.pool.num_blocks, "KV blocks leaked"


def test_each_request_alone_matches_reference(tiny_model_dir, prompts, expected):
    llm = LLM(str(tiny_model_dir))
    for i in range(0, len(prompts), 3):
        for b in BUDGETS:
            check(llm.generate([prompts[i]], greedy(b)), [(i, b)], expected)


def test_step_logits_match_reference_within_1e4(tiny_model_dir, reference, prompts, expected):
    """Spy on the runner: every sampled row's logits equal the reference's for that step."""
    llm = LLM(str(tiny_model_dir), max_num_batched_tokens=24)
    runner = llm.engine.runner
    seen: list[torch.Tensor] = []
    real_execute = runner.execute

    def recording_execute(batch):
        out = real_execute(batch)
        seen.append(out.logits.clone())
        return out

    runner.execute = recording_execute
    cases = [(i, b) for i in (0, 3, 7, 11) for b in BUDGETS]
    # One request at a time so that each step's single logit row belongs to that request.
    for i, b in cases:
        seen.clear()
        llm.generate([prompts[i]], greedy(b))
        rows = [s[-1] for s in seen if s.shape[0]]                 # chunks before the last
        rows = rows[-MAX_NEW:]                                     # have no logit rows
        for step, (got, want) in enumerate(zip(rows, expected[(i, b)][2])):
            err = (got - want).abs().max().item()
            assert err <= 1e-4, f"prompt {i} budget {b} step {step}: max abs error {err}"


def test_no_leaks_after_finish_abort_and_preemption(tiny_model_dir, prompts):
    llm = LLM(str(tiny_model_dir), max_num_batched_tokens=32, kv_cache_memory=48 * 4096)
    eng = llm.engine
    for k, p in enumerate(prompts[:12]):
        eng.add_request(f"r{k}", p, SamplingParams(max_tokens=20, temperature=0.7, seed=k,
                                                   ignore_eos=True, think_budget=k % 4 / 3))
    steps = 0
    while eng.has_unfinished():
        eng.step()
        steps += 1
        if steps == 3:
            eng.abort("r1")                                        # running
            eng.abort("r11")                                       # probably still waiting
        if steps == 8:
            eng.abort("r4")
    assert eng.scheduler.num_preemptions > 0
    assert eng.kv.pool.num_free == eng.kv.pool.num_blocks
    assert eng.kv.num_sequences == 0 and not eng.requests
