"""The CPU decode step (runner/decode_step.py) and its torch.compile'd variants
(runner/cpu_compile.py): padded pure step = reference, compiled step = eager step =
reference (logits within 1e-4 fp32, same tokens and routing), and a failed compile falls back
to eager steps with the reference's output."""

from __future__ import annotations

import random

import pytest
import torch
from itt_testing import (
    HELDOUT,
    next_token_slots,
    reference_greedy,
    slots_written,
)

from itt_runtime.llm import LLM
from itt_runtime.model import packed_linear
from itt_runtime.model.loader import load_model
from itt_runtime.runner import cpu_compile
from itt_runtime.runner.cpu_compile import SPLIT_MIN_ROWS, VARIANTS, CompiledDecode, own_code
from itt_runtime.sampling_params import SamplingParams

MAX_NEW = 5
BUDGETS = [0.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def prompts(tokenizer):
    lines = [ln for ln in HELDOUT.read_text().splitlines() if ln.strip()]
    rng = random.Random(0)
    out = []
    for line in rng.sample(lines, 20):
        ids = tokenizer.encode(line)
        if len(out) < 8 and len(ids) >= 2:
            out.append(ids[: rng.randint(2, min(len(ids), 40))])
    return out


def greedy(budget: float, n: int = MAX_NEW) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, think_budget=budget, ignore_eos=True)


def llm_with(model_dir, engine: dict | None = None, **kw) -> tuple[LLM, CompiledDecode]:
    llm = LLM(str(model_dir), max_num_seqs=8, **(engine or {}))
    eng = llm.engine
    compiled = CompiledDecode(eng.runner.forward, 8, **kw)
    eng.runner.compiled = compiled
    eng.runner.compile_source = None      # torch.compile in this process (test_aot_compile.py
                                          # has the ahead-of-time child)
    return llm, compiled


def check_against_reference(llm: LLM, model_dir, prompts, budgets, lengths=None) -> None:
    reference, _ = load_model(model_dir)
    cases = [(i, b) for i in range(len(prompts)) for b in budgets]
    lengths = lengths or [MAX_NEW] * len(cases)
    outs = llm.generate([prompts[i] for i, _ in cases],
                        [greedy(b, n) for (_, b), n in zip(cases, lengths)])
    for out, (i, b), n in zip(outs, cases, lengths):
        tokens, extra, _ = reference_greedy(reference, prompts[i], b, n)
        assert out.outputs[0].token_ids == tokens, f"prompt {i} budget {b}: tokens differ"
        assert out.outputs[0].thinking == extra, f"prompt {i} budget {b}: thinking differs"


def test_padded_pure_decode_step_matches_reference(tiny_model_dir, prompts):
    """Eager, no compiler: rows padded to batch buckets, tables to width buckets, new K/V
    written after the step; budgets mixed, requests ending at different steps."""
    llm, compiled = llm_with(tiny_model_dir, compile=False)
    lengths = [1 + k % MAX_NEW for k in range(len(prompts) * len(BUDGETS))]
    check_against_reference(llm, tiny_model_dir, prompts, BUDGETS, lengths)
    assert not compiled.variants and not compiled.compile_seconds    # nothing was compiled
    zero = llm.generate(prompts[:3], greedy(0.0))           # budget 0 only: no routed steps
    assert [o.outputs[0].thinking for o in zero] == [[0] * MAX_NEW] * 3


def test_decode_step_writes_only_its_own_slots(tiny_model_dir, prompts):
    """The K/V written after a decode step land exactly in the slots its real rows own (and
    scratch): every stream's next slot at b = 1, only the base streams' at b = 0."""
    llm, _ = llm_with(tiny_model_dir, compile=False)
    eng = llm.engine
    budgets = [1.0, 0.0, 1.0]
    for k, b in enumerate(budgets):
        eng.add_request(str(k), prompts[k], greedy(b))
    eng.step()                                                     # the prompts
    expected = next_token_slots(eng, budgets)
    before = eng.cache.k.clone()
    eng.step()                                                     # one padded decode step
    assert slots_written(eng, before) == expected


def run_and_trace(llm: LLM, compiled: CompiledDecode, model_dir, prompts) -> list[list]:
    """Generation equal to the reference's (small chunks and a small pool: chunked prefill,
    preemption, prefix-cache hits); returns, per engine step, the paths it ran: "eager", or
    the largest row count of a sequence in a compiled call (1: decode rows only)."""
    runner = llm.engine.runner
    calls: list = []                              # "step", then the paths it ran
    run, execute, step = compiled.run, runner.forward.execute, runner.execute_model

    def spy_run(scheduled, kvs):
        calls.append(max(s.num_new_tokens for s in scheduled))
        return run(scheduled, kvs)

    def spy_execute(batch):
        calls.append("eager")
        return execute(batch)

    def spy_step(plan):
        calls.append("step")
        return step(plan)

    compiled.run, runner.forward.execute, runner.execute_model = spy_run, spy_execute, spy_step
    check_against_reference(llm, model_dir, prompts, BUDGETS,
                            [2 + k % 4 for k in range(len(prompts) * len(BUDGETS))])
    assert llm.engine.scheduler.num_preemptions > 0
    steps: list[list] = []
    for kind in calls:
        if kind == "step":
            steps.append([])
        else:
            steps[-1].append(kind)
    return steps


def test_prompt_chunks_run_through_the_compiled_step(tiny_model_dir, prompts):
    """Prompt chunks, alone or beside decoding rows, run through the compiled step as token
    rows (rows_step) with the reference's output: nothing runs eagerly."""
    llm, compiled = llm_with(tiny_model_dir, compile=False,
                             engine=dict(max_num_batched_tokens=16, kv_cache_memory=31 * 4096))
    steps = run_and_trace(llm, compiled, tiny_model_dir, prompts)
    assert all(len(s) == 1 and s[0] != "eager" for s in steps), steps
    assert any(s[0] > 1 for s in steps), "no prompt chunk ran compiled"


def test_steps_too_large_run_their_prompt_rows_eagerly(tiny_model_dir, prompts, monkeypatch):
    """A step of more rows than a compiled step takes runs its decode rows compiled and its
    prompt rows eagerly after them, with the reference's output."""
    monkeypatch.setattr(cpu_compile, "MAX_STEP_ROWS", 4)
    llm, compiled = llm_with(tiny_model_dir, compile=False,
                             engine=dict(max_num_batched_tokens=16, kv_cache_memory=31 * 4096))
    steps = run_and_trace(llm, compiled, tiny_model_dir, prompts)
    assert [1, "eager"] in steps, "no step ran decode rows compiled beside a prompt"
    assert ["eager"] in steps
    assert all(s in ([1], ["eager"], [1, "eager"]) or (len(s) == 1 and s[0] <= 4)
               for s in steps), steps


@pytest.mark.skipif(not packed_linear.available(), reason="torch without oneDNN")
def test_packed_weights_give_the_reference_output(tiny_model_dir, prompts):
    """With the weights packed for oneDNN (as once a variant of several rows is ready), the
    steps of several rows (prompt chunks and decode batches) run their MLP and head matmuls
    on the packed copies, with the reference's output under chunked prefill, preemption and
    prefix-cache hits."""
    llm, compiled = llm_with(tiny_model_dir, compile=False,
                             engine=dict(max_num_batched_tokens=16, kv_cache_memory=31 * 4096))
    compiled._pack_weights()
    model = llm.engine.model
    assert compiled.packed_bytes and model.head_weight() is not None
    assert all(packed_linear.is_packed(w) for layer in model.itt_layer_list
               for w in (layer.block.fused_gate_up, layer.block.down_proj.weight))
    assert packed_linear.is_packed(model.head_weight())
    steps = run_and_trace(llm, compiled, tiny_model_dir, prompts)
    assert any(s[0] > 1 for s in steps), "no prompt chunk ran compiled"


def test_weights_that_cannot_be_packed_serve_plain(tiny_model_dir, prompts, monkeypatch,
                                                   caplog):
    """A oneDNN that refuses to pack (a build without its kernels): logged, nothing packed,
    and the steps of several rows run on the plain weights with the reference's output."""
    def refuse(weight):
        raise RuntimeError("no oneDNN kernels here")

    monkeypatch.setattr(packed_linear, "pack", refuse)
    llm, compiled = llm_with(tiny_model_dir, compile=False)
    compiled._pack_weights()
    assert compiled.packed_bytes == 0 and "packing weights for oneDNN failed" in caplog.text
    assert not packed_linear.is_packed(llm.engine.model.head_weight())
    check_against_reference(llm, tiny_model_dir, prompts[:4], BUDGETS)


def test_rows_at_budget_0_run_apart_from_rows_that_route(tiny_model_dir, prompts):
    """A decode batch with enough rows at budget 0 runs them through the budget-0 step and
    the others through the routable one, in one engine step; generation equals the
    reference's for both kinds of row."""
    llm, compiled = llm_with(tiny_model_dir, compile=False)
    parts: list[list[bool]] = []                 # per compiled call: each row routes?
    run = compiled._run

    def spy(scheduled, kvs):
        if all(s.num_new_tokens == 1 for s in scheduled):      # decode steps split
            parts.append([s.seq.routable for s in scheduled])
        return run(scheduled, kvs)

    compiled._run = spy
    n_zero = SPLIT_MIN_ROWS + 1
    budgets = [0.0] * n_zero + [1.0, 0.5]
    reference, _ = load_model(tiny_model_dir)
    outs = llm.generate([prompts[k % len(prompts)] for k in range(len(budgets))],
                        [greedy(b) for b in budgets])
    for k, (out, b) in enumerate(zip(outs, budgets)):
        tokens, extra, _ = reference_greedy(reference, prompts[k % len(prompts)], b, MAX_NEW)
        assert (out.outputs[0].token_ids, out.outputs[0].thinking) == (tokens, extra), k
    assert [True, True] in parts and [False] * n_zero in parts, parts
    assert not any(True in p and False in p for p in parts)    # never one mixed call


@pytest.mark.slow
def test_traced_step_equals_reference(small_model_dir, prompts):
    """A lighter stand-in for the inductor test below (about 15 s on a quiet machine, 50 s on
    a busy one, hence slow too): the step traced whole by dynamo (fullgraph, dynamic batch
    and width) and run without code generation, every variant (several rows or one,
    routable or at budget 0), for batches of 6 down to 1 rows. The fast tests above cover
    the step's semantics eagerly."""
    llm, compiled = llm_with(small_model_dir, backend="eager")
    check_against_reference(llm, small_model_dir, prompts[:3], [0.0, 1.0],
                            lengths=[MAX_NEW, 2, 3, MAX_NEW, 4, 1])
    check_against_reference(llm, small_model_dir, prompts[:2], [0.0])
    for budget in (1.0, 0.0):                      # single rows: their own variants
        check_against_reference(llm, small_model_dir, prompts[2:3], [budget])
    # (one row, routable): batches of one row have their own variant, with no padding row.
    assert set(compiled.variants) == {(False, True), (True, True), (False, False),
                                      (True, False)} and not compiled.eager_keys
    assert llm.engine.runner.compiled is compiled


@pytest.mark.slow
def test_compiled_step_equals_eager_step_and_reference(small_model_dir, prompts):
    """torch.compile (inductor, the shipped options; minutes of compiling on a busy 2-core
    machine, hence slow), every variant: mixed budgets and
    budget 0, over batches of 6 down to 1 rows (dynamic shapes: one compile per variant). Logits of
    the compiled and the eager step agree within 1e-4, routing exactly, and generation
    equals the reference model's."""
    llm, compiled = llm_with(small_model_dir)
    check_against_reference(llm, small_model_dir, prompts[:3], [0.0, 1.0],
                            lengths=[MAX_NEW, 2, 3, MAX_NEW, 4, 1])
    assert set(compiled.variants) == {(False, True)}, compiled.variants
    check_against_reference(llm, small_model_dir, prompts[:2], [0.0])
    for budget in (1.0, 0.0):                      # single rows: their own variants
        check_against_reference(llm, small_model_dir, prompts[2:3], [budget])
    assert set(compiled.variants) == {(False, True), (True, True), (False, False),
                                      (True, False)}
    assert compiled.compile_seconds > 0 and not compiled.eager_keys
    # One step's outputs, compiled vs eager, on the same inputs (the cache as it is now),
    # a shape the compile never saw.
    eng = llm.engine
    key = Bp, W, _ = (5, 3, True)
    cfg = eng.model_config
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (Bp,), generator=gen)
    pos = torch.randint(0, W * eng.config.block_size, (Bp,), generator=gen)
    streams = cfg.num_kv_streams
    tables = torch.randint(0, eng.cache.scratch_block, (Bp, streams, W), generator=gen)
    lengths = torch.minimum(pos[:, None].expand(Bp, streams), pos[:, None])
    thresholds = torch.tensor([cfg.thresholds_for(0.5)] * Bp)
    rows = torch.arange(Bp)                  # decode rows: each its own sequence's first
    args = (eng.cache.k, eng.cache.v, ids, pos, rows, tables, lengths, thresholds, rows)
    with torch.inference_mode():
        got, want = compiled._call(key, args), compiled._eager(key, args)
    assert (got[0] - want[0]).abs().max() <= 1e-4                  # logits
    assert torch.equal(got[1], want[1])                            # routing
    assert torch.equal(got[4], want[4])                            # cache slots
    assert torch.allclose(got[2], want[2], atol=1e-4)              # new K
    assert torch.allclose(got[3], want[3], atol=1e-4)              # new V


@pytest.mark.slow
def test_warm_up_compiles_every_variant_before_the_first_step(small_model_dir, prompts):
    """The server's start-up warm-up: after it every variant exists, generation then
    compiles nothing more (dynamo makes no new graph: the warm-up's padding step had the
    same guards as real steps) and still equals the reference, and the warm-up wrote
    nothing to the cache. Traced without code generation (backend "eager"), as above."""
    from torch._dynamo.utils import counters
    llm, compiled = llm_with(small_model_dir, backend="eager")
    cache = llm.engine.cache
    before = (cache.k.clone(), cache.v.clone())
    traced = counters["stats"]["unique_graphs"]
    llm.engine.runner.warm_up()
    assert counters["stats"]["unique_graphs"] >= traced + 4          # one graph per variant
    assert set(compiled.variants) == {(False, True), (True, True), (False, False),
                                      (True, False)} and not compiled.eager_keys
    assert torch.equal(cache.k, before[0]) and torch.equal(cache.v, before[1])
    seconds, graphs = compiled.compile_seconds, counters["stats"]["unique_graphs"]
    check_against_reference(llm, small_model_dir, prompts[:3], [0.0, 1.0],
                            lengths=[MAX_NEW, 2, 3, MAX_NEW, 4, 1])
    check_against_reference(llm, small_model_dir, prompts[2:3], [1.0])       # one row
    check_against_reference(llm, small_model_dir, prompts[2:3], [0.0])
    assert compiled.compile_seconds == seconds
    assert counters["stats"]["unique_graphs"] == graphs
    assert llm.engine.runner.compiled is compiled


def test_failed_warm_up_runs_every_step_eagerly(tiny_model_dir, prompts, caplog):
    """A warm-up whose compile fails leaves the server serving, eagerly, as a failed
    compile while serving does."""
    llm, compiled = llm_with(tiny_model_dir, options={"no_such_inductor_option": True})
    llm.engine.runner.warm_up()
    assert llm.engine.runner.compiled is None and not compiled.variants
    assert "compiling the decode steps failed; running every step eagerly" in caplog.text
    check_against_reference(llm, tiny_model_dir, prompts[:2], [0.0, 0.5])


def test_failed_compile_falls_back_to_eager(tiny_model_dir, prompts, caplog):
    """A compile that really fails (an option inductor does not have) is caught before any
    K/V is written; that step and every later one run eagerly, and the output is still the
    reference's."""
    llm, compiled = llm_with(tiny_model_dir, options={"no_such_inductor_option": True})
    check_against_reference(llm, tiny_model_dir, prompts[:3], [0.0, 0.5])
    assert llm.engine.runner.compiled is None and not compiled.variants
    assert "compiled step failed; running every step eagerly" in caplog.text
    assert "no_such_inductor_option" in caplog.text


def test_compile_budget_spent_runs_eagerly(tiny_model_dir, prompts, caplog):
    """With the compile budget spent, new shapes run the same step eagerly (logged)."""
    llm, compiled = llm_with(tiny_model_dir, compile_budget_s=0.0)
    check_against_reference(llm, tiny_model_dir, prompts[:2], [0.5])
    assert compiled.eager_keys and not compiled.variants
    assert llm.engine.runner.compiled is compiled
    assert "compile budget" in caplog.text


def test_engine_flag_builds_the_compiled_runner(tiny_model_dir):
    on = LLM(str(tiny_model_dir), cpu_compile=True).engine.runner
    off = LLM(str(tiny_model_dir), compile="off").engine.runner
    assert isinstance(on.compiled, CompiledDecode) and on.compiled.lazy
    assert off.compiled is None
    eager = LLM(str(tiny_model_dir), cpu_compile=True, enforce_eager=True).engine.runner
    assert eager.compiled is None


def test_auto_mode_never_waits_for_a_compile(tiny_model_dir, prompts):
    """``compile="auto"`` builds the compiled runner but compiles only when asked to in the
    background: until a variant is ready its steps run the plain eager forward, and nothing
    is compiled on the way (offline engines stay eager)."""
    llm = LLM(str(tiny_model_dir), max_num_seqs=8, compile="auto")
    compiled = llm.engine.runner.compiled
    assert isinstance(compiled, CompiledDecode) and not compiled.lazy
    calls = []
    run = compiled.run
    compiled.run = lambda *a: calls.append(1) or run(*a)
    check_against_reference(llm, tiny_model_dir, prompts[:3], [0.0, 0.5, 1.0])
    assert not calls and not compiled.variants and compiled.compile_seconds == 0


@pytest.mark.slow
def test_background_compile_swaps_each_variant_in_when_ready(small_model_dir, prompts):
    """``compile_in_background`` (in-process, without a checkpoint source) while generation
    runs: outputs equal the reference throughout; once the thread ends every variant is ready,
    and decode steps then run compiled. Traced without code generation (backend "eager")."""
    llm, compiled = llm_with(small_model_dir, backend="eager", lazy=False)
    thread = compiled.compile_in_background()
    check_against_reference(llm, small_model_dir, prompts[:3], [0.0, 1.0])
    thread.join(600)
    assert set(compiled.variants) == set(VARIANTS) and not compiled.failed
    assert set(compiled.ready_seconds) == set(VARIANTS)
    calls = []
    run = compiled.run
    compiled.run = lambda *a: calls.append(1) or run(*a)
    check_against_reference(llm, small_model_dir, prompts[:3], [0.0, 1.0])
    assert calls, "no decode step ran compiled once every variant was ready"


def test_each_compiled_step_has_its_own_code_object():
    """Dynamo caps compiled entries per code object (8); the step closures of one ``def``
    share theirs, so each variant gets a copy (a process with two compiled engines of four
    variants each, as the slow tests above make, otherwise fails its ninth compile)."""
    def make(k):
        def step(x):
            return x + k
        return step

    a, b = make(1), make(2)
    assert a.__code__ is b.__code__                     # what dynamo would see
    ca, cb = own_code(a), own_code(b)
    assert ca.__code__ is not cb.__code__ and ca.__code__ is not a.__code__
    assert (ca(1), cb(1)) == (2, 3)                     # same behaviour, closure kept
