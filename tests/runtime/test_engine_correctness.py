"""The engine reproduces the reference model (ITT_SPEC "Ground truth"): greedy tokens, logits
and per-token routing, alone or batched with other budgets, with chunked prefill on and off,
and through preemption. fp32 on CPU."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from itt_testing import HELDOUT, next_token_slots, reference_greedy, slots_written
from torch.utils._python_dispatch import TorchDispatchMode

from itt_runtime.engine.sequence import Status
from itt_runtime.kv_cache.manager import cdiv
from itt_runtime.llm import LLM
from itt_runtime.model.loader import load_model
from itt_runtime.runner.cuda_graphs import DecodeGraphs
from itt_runtime.sampling_params import SamplingParams

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


TINY_POOL = 61 * 4096              # 60 blocks of 4 KiB + the scratch block
ENGINES = {
    "chunked-small-budget": dict(max_num_batched_tokens=16),
    "no-chunking": dict(max_num_batched_tokens=512, enable_chunked_prefill=False),
    "tiny-pool": dict(max_num_batched_tokens=64, kv_cache_memory=TINY_POOL),
    # Routed steps on every token, kept where routed (the sync-free GPU path).
    "masked-chunked": dict(max_num_batched_tokens=16, routed_compute="masked"),
    "masked-tiny-pool": dict(max_num_batched_tokens=64, kv_cache_memory=TINY_POOL,
                             routed_compute="masked"),
    # Prefix caching is on in all of the above (preempted requests restart from their own
    # cached prefixes); off here, as it was before caching existed.
    "no-prefix-caching": dict(max_num_batched_tokens=64, kv_cache_memory=TINY_POOL,
                              enable_prefix_caching=False),
}


def assert_no_leaks(eng) -> None:
    """No block is held by a sequence, and once the prefix cache lets go, every block is
    free: reference counts went back to zero."""
    pool = eng.kv.pool
    assert pool.usage == 0.0, "KV blocks leaked"
    if eng.kv.prefix_cache is not None:
        eng.kv.prefix_cache.clear()
    assert pool.num_free == pool.num_blocks and pool.num_evictable == 0, "KV blocks leaked"


@pytest.mark.parametrize("name", list(ENGINES))
def test_mixed_batch_matches_reference(name, tiny_model_dir, prompts, expected):
    llm = LLM(str(tiny_model_dir), **ENGINES[name])
    cases = [(i, b) for i in range(len(prompts)) for b in BUDGETS]
    random.Random(1).shuffle(cases)                               # budgets interleaved
    outs = llm.generate([prompts[i] for i, _ in cases], [greedy(b) for _, b in cases])
    check(outs, cases, expected)
    if name.endswith("tiny-pool"):
        assert llm.engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert_no_leaks(llm.engine)


def test_prompt_chunks_share_one_padded_attention_call(tiny_model_dir, reference, prompts):
    """Prompts admitted in one step attend in one call, padded to the longest (routed
    streams too, with their routed counts as chunk lengths); long rows, or a long one beside
    short ones, attend row by row. Tokens and thinking depths equal the reference's either way."""
    llm = LLM(str(tiny_model_dir), max_num_batched_tokens=1024)
    forward = llm.engine.runner.forward
    padded_calls: list[list[int]] = []
    real_attend_padded = forward._attend_padded

    def spy(q, spos, chunks, stream, batch):
        padded_calls.append([n for _, n in chunks])
        return real_attend_padded(q, spos, chunks, stream, batch)

    forward._attend_padded = spy
    short = [p[:24] for p in prompts]                       # 1 … 24 tokens
    cases = [(i, b) for i in range(len(short)) for b in BUDGETS]
    outs = llm.generate([short[i] for i, _ in cases], [greedy(b) for _, b in cases])
    check(outs, cases, {(i, b): reference_greedy(reference[0], short[i], b, MAX_NEW)
                        for i, b in cases})
    assert any(len(set(c)) > 1 for c in padded_calls), "no padded call of unequal rows"
    assert all(len(c) * max(c) <= 2 * sum(c) and max(c) <= 32 for c in padded_calls)


def test_each_request_alone_matches_reference(tiny_model_dir, prompts, expected):
    llm = LLM(str(tiny_model_dir))
    for i in range(0, len(prompts), 3):
        for b in BUDGETS:
            check(llm.generate([prompts[i]], greedy(b)), [(i, b)], expected)


def test_padded_decode_steps_match_reference(tiny_model_dir, prompts, expected):
    """The CUDA-graph decode path, run eagerly: rows padded to batch buckets, block tables
    to width buckets, padding rows writing only to scratch."""
    llm = LLM(str(tiny_model_dir), max_num_batched_tokens=2048, max_num_seqs=48,
              routed_compute="masked")
    eng = llm.engine
    graphs = eng.runner.graphs = DecodeGraphs(eng.runner.forward, eng.config.max_num_seqs,
                                       cdiv(eng.max_model_len, eng.config.block_size),
                                       capture=False)
    cases = [(i, b) for i in range(len(prompts)) for b in BUDGETS]
    random.Random(2).shuffle(cases)
    # Requests stop after 1 … 6 tokens, so decode batches shrink through many sizes; the
    # five shortest prompts run longest, so block tables narrow at the end too.
    shortest = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))[:5]
    # A long-running request first: it owns block 0, which a padding row must never touch.
    first = next(c for c in cases if c[0] in shortest and c[1] > 0)
    cases.remove(first)
    cases.insert(0, first)
    lengths = [MAX_NEW if i in shortest else 1 + k % (MAX_NEW - 1)
               for k, (i, _) in enumerate(cases)]
    params = [replace(greedy(b), max_tokens=n) for (_, b), n in zip(cases, lengths)]
    outs = llm.generate([prompts[i] for i, _ in cases], params)
    for out, case, n in zip(outs, cases, lengths):
        tokens, extra, _ = expected[case]
        assert out.outputs[0].token_ids == tokens[:n], f"{case}: tokens differ"
        assert out.outputs[0].thinking == extra[:n], f"{case}: thinking depth differs"
    shapes = set(graphs.graphs)
    assert len({bp for bp, _, _ in shapes}) >= 4 and len({w for _, w, _ in shapes}) >= 2, shapes
    assert any(bp not in (1, 2, 4, 8) for bp, _, _ in shapes), shapes   # a bucket past 8
    # Budget-0 rows only: the routed steps are skipped, in graphs of their own.
    zero = [(i, 0.0) for i in range(0, len(prompts), 2)]
    check(llm.generate([prompts[i] for i, _ in zero], greedy(0.0)), zero, expected)
    assert any(not routable for _, _, routable in set(graphs.graphs) - shapes)
    assert_no_leaks(eng)


def test_padded_decode_step_writes_only_its_own_slots(tiny_model_dir, prompts):
    """A padded decode step changes exactly the cache slots its real rows own (and scratch):
    at b = 1 every stream gains its next slot, at b = 0 only the base streams do."""
    llm = LLM(str(tiny_model_dir), routed_compute="masked")
    eng = llm.engine
    graphs = eng.runner.graphs = DecodeGraphs(eng.runner.forward, 8, 8, capture=False)
    budgets = [1.0, 0.0, 1.0]
    for k, b in enumerate(budgets):
        eng.add_request(str(k), prompts[k + 1], greedy(b))
    eng.step()                                                     # the prompts
    expected = next_token_slots(eng, budgets)
    before = eng.cache.k.clone()
    eng.step()                                                     # one padded decode step
    assert [(bp, r) for bp, _, r in graphs.graphs] == [(4, True)]  # 3 rows + 1 padding row
    assert slots_written(eng, before) == expected


def test_failed_capture_falls_back_to_eager_steps(tiny_model_dir, prompts, expected, caplog):
    """If capturing a CUDA graph fails (simulated here: CPU cannot capture), the step runs
    eagerly, later steps too, and the output is still the reference's."""
    llm = LLM(str(tiny_model_dir), routed_compute="masked")
    eng = llm.engine
    graphs = eng.runner.graphs = DecodeGraphs(eng.runner.forward, 8, 8, capture=False)
    graphs.capture = True

    def failing_capture(g):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs._capture = failing_capture
    cases = [(i, b) for i in (2, 5, 9) for b in (0.25, 1.0)]
    outs = llm.generate([prompts[i] for i, _ in cases], [greedy(b) for _, b in cases])
    check(outs, cases, expected)
    assert eng.runner.graphs is None and not graphs.graphs
    assert "CUDA graph capture failed" in caplog.text


@pytest.mark.parametrize("routed_compute", ["gather", "masked"])
def test_step_logits_match_reference_within_1e4(routed_compute, tiny_model_dir, reference,
                                                prompts, expected):
    """Spy on the runner: every sampled row's logits equal the reference's for that step
    (speculation off: a step samples one token a row; test_speculative has its own)."""
    llm = LLM(str(tiny_model_dir), max_num_batched_tokens=24, routed_compute=routed_compute,
              speculative_config="off")
    runner = llm.engine.runner.forward
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
    llm = LLM(str(tiny_model_dir), max_num_batched_tokens=32, kv_cache_memory=49 * 4096)
    eng = llm.engine
    for k, p in enumerate(prompts[:12]):
        eng.add_request(f"r{k}", p, SamplingParams(max_tokens=20, temperature=0.7, seed=k,
                                                   ignore_eos=True, think_budget=k % 4 / 3))
    steps = 0
    while eng.has_unfinished():
        eng.step()
        steps += 1
        if steps == 3:
            # The 32-token budget has not reached r11 yet; r1 is in the batch.
            (r1,), (r11,) = eng.requests["r1"].seqs, eng.requests["r11"].seqs
            assert r1.status is Status.RUNNING and r11.status is Status.WAITING
            assert r11.num_computed_tokens == 0
            pool = eng.kv.pool          # cached blocks become evictable rather than free
            free, held = pool.num_free + pool.num_evictable, eng.kv.get("r1").num_blocks
            for rid in ("r1", "r11"):
                out = eng.abort(rid)
                assert out.finished and out.outputs[0].finish_reason == "abort"
                assert rid not in eng.requests
            assert r1.finished and r11.finished
            assert pool.num_free + pool.num_evictable == free + held > free
        if steps == 8:
            eng.abort("r4")
    assert eng.scheduler.num_preemptions > 0
    assert_no_leaks(eng)
    assert eng.kv.num_sequences == 0 and not eng.requests


# Ops whose result the host must wait for (a scalar read, or an output sized by data).
SYNCING_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select",
               "aten.bincount", "aten._unique", "aten.unique", "aten.repeat_interleave.Tensor")


class OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("routed_compute", ["gather", "masked"])
def test_masked_steps_need_no_device_sync(routed_compute, tiny_model_dir, prompts):
    """With masked routing no step — decode-only, prefill, or chunks mixed with decodes —
    runs an op that makes the host wait for the device, so on CUDA a step's only sync is the
    engine reading its results. Gathered steps do (the routed count sizes the gather), which
    shows the check can see one."""
    llm = LLM(str(tiny_model_dir), routed_compute=routed_compute, max_num_batched_tokens=40)
    eng = llm.engine
    seen: list[tuple[str, set[str]]] = []
    real_execute = eng.runner.forward.execute

    def recorded(batch):
        with OpRecorder() as rec:
            out = real_execute(batch)
        kind = "decode" if not batch.chunk_lens else "mixed" if batch.num_decode else "prefill"
        seen.append((kind, {op for op in rec.ops if op.startswith(SYNCING_OPS)}))
        return out

    eng.runner.forward.execute = recorded
    llm.generate(prompts[1:9], [greedy(BUDGETS[1 + k % 3]) for k in range(8)])
    assert {kind for kind, _ in seen} == {"decode", "mixed", "prefill"}
    syncing = set().union(*(ops for _, ops in seen))
    if routed_compute == "masked":
        assert syncing == set()
    else:
        assert "aten.nonzero.default" in syncing
