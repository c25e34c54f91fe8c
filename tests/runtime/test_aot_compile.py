"""Decode steps compiled ahead of time in a child process (runner/aot_compile.py), as a server
does by default: the packages a real compile child writes give the reference's output; a
second engine of the same model loads them from the compile cache without a child; a child
that fails leaves its variants eager and the output unchanged; the cache key follows the
model's shapes.

The compiles are real (AOTInductor, a C++ compiler), of the smallest ITT model (two layers,
one ×2), two variants: about a minute on a 2-core machine."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from itt_testing import HELDOUT, reference_greedy
from live_server import MODEL_NAME, launch
from prometheus_client.parser import text_string_to_metric_families

from itt_runtime.llm import LLM
from itt_runtime.model.loader import load_model
from itt_runtime.runner import aot_compile
from itt_runtime.runner.aot_compile import FlatStep, cache_dir
from itt_runtime.runner.cpu_compile import CompiledDecode
from itt_runtime.sampling_params import SamplingParams
from loadtest.servers import compiled_steps

ROUTED = [(True, True), (False, True)]       # one row / several, able to route
MAX_NEW = 6


@pytest.fixture(scope="module")
def aot_cache(tmp_path_factory):
    """A compile cache of this module's own, so that every run compiles (and nothing from
    this machine's cache is reused)."""
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    path = tmp_path_factory.mktemp("inductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    cache_dir.cache_clear()
    yield path
    if old is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = old
    cache_dir.cache_clear()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    rng = random.Random(1)
    lines = [ln for ln in HELDOUT.read_text().splitlines() if len(ln.split()) > 4]
    return [tokenizer.encode(ln)[: rng.randint(3, 30)] for ln in rng.sample(lines, 4)]


def greedy(budget: float) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_NEW, temperature=0.0, think_budget=budget,
                          ignore_eos=True)


def counting(compiled: CompiledDecode) -> list[int]:
    """The steps ``compiled`` runs (the real run, recorded on the way): for each, the most
    tokens one sequence computed in it (1: decode rows only; more: a prompt chunk)."""
    calls: list[int] = []
    run = compiled.run

    def spy(scheduled, kvs):
        calls.append(max(s.num_new_tokens for s in scheduled))
        return run(scheduled, kvs)

    compiled.run = spy                                            # type: ignore[method-assign]
    return calls


def check_against_reference(llm: LLM, model_dir, prompts, budgets) -> None:
    reference, _ = load_model(model_dir)
    cases = [(p, b) for p in prompts for b in budgets]
    outs = llm.generate([p for p, _ in cases], [greedy(b) for _, b in cases])
    for out, (p, b) in zip(outs, cases):
        tokens, extra, _ = reference_greedy(reference, p, b, MAX_NEW)
        assert out.outputs[0].token_ids == tokens, f"budget {b}: tokens differ"
        assert out.outputs[0].thinking == extra, f"budget {b}: thinking differs"


def test_compiled_ahead_in_a_child_then_loaded_from_the_cache(small_model_dir, aot_cache,
                                                              prompts):
    llm = LLM(str(small_model_dir), max_num_seqs=8, compile="auto")
    runner = llm.engine.runner
    compiled = runner.compiled
    assert compiled is not None and runner.compile_source is not None
    assert compiled.status()["one-row-routed"] == ("compiling", None)
    compiled.compile_ahead(runner.compile_source, wait=True, variants=ROUTED)
    status = compiled.status()
    assert [status[n][0] for n in ("one-row-routed", "rows-routed")] == ["ready", "ready"]
    assert status["rows-budget0"] == ("compiling", None)          # not asked for here
    assert compiled.compile_seconds > 0 and not compiled.failed
    packages = sorted(p.name for p in (aot_cache / "aot").glob("*.pt2"))
    assert len(packages) == 2 and all(".partial" not in p for p in packages)
    # Loaded packages are called with the step's flat arguments (FlatStep), checked once.
    step = compiled.variants[(True, True)]
    assert isinstance(step, FlatStep) and step.num_inputs == 9
    with pytest.raises(TypeError, match="takes 9 tensors, got 1"):
        step(torch.zeros(1))
    calls = counting(compiled)
    check_against_reference(llm, small_model_dir, prompts, [0.5, 1.0])
    assert 1 in calls, "no decode step ran compiled"
    assert max(calls) > 1, "no prompt chunk ran compiled"

    # A second engine of the same model: both variants from the cache, no compile process;
    # loading marks them used (their modification time), which keeps them from ``prune``.
    month_ago = time.time() - 31 * 86400
    for path in (aot_cache / "aot").glob("*.pt2"):
        os.utime(path, (month_ago, month_ago))
    again = LLM(str(small_model_dir), max_num_seqs=8, compile="auto")
    second = again.engine.runner.compiled
    start = time.perf_counter()
    thread = second.compile_ahead(again.engine.runner.compile_source, variants=ROUTED)
    assert thread is None and second.compile_seconds == 0
    assert all(p.stat().st_mtime > month_ago + 86400 for p in (aot_cache / "aot").glob("*.pt2"))
    assert time.perf_counter() - start < 30
    assert all(second.status()[n][0] == "ready" for n in ("one-row-routed", "rows-routed"))
    calls = counting(second)
    check_against_reference(again, small_model_dir, prompts[:2], [1.0])
    assert calls


def test_int8_steps_compile_and_agree_with_the_eager_int8_engine(small_model_dir, aot_cache,
                                                                prompts):
    """``--quantization int8`` with compiled steps: the child quantizes the model as the
    engine did (the same layout: its own signature, not the fp32 model's), the packages call
    fbgemm through ``itt::int8_linear`` on the engine's own packed weights, and greedy output
    and thinking equal the eager int8 engine's, decode rows and prompt chunks compiled."""
    eager = LLM(str(small_model_dir), max_num_seqs=8, quantization="int8")
    llm = LLM(str(small_model_dir), max_num_seqs=8, compile="auto", quantization="int8")
    compiled = llm.engine.runner.compiled
    fp32 = LLM(str(small_model_dir), compile="auto").engine.runner.compiled
    assert (aot_compile.signature(compiled.model, compiled.cache.k, ROUTED[0], 2)
            != aot_compile.signature(fp32.model, fp32.cache.k, ROUTED[0], 2))
    compiled.compile_ahead(llm.engine.runner.compile_source, wait=True, variants=ROUTED)
    assert not compiled.failed
    assert [compiled.status()[n][0] for n in ("one-row-routed", "rows-routed")] == ["ready"] * 2
    calls = counting(compiled)
    cases = [(p, b) for p in prompts for b in (0.5, 1.0)]
    want = eager.generate([p for p, _ in cases], [greedy(b) for _, b in cases])
    got = llm.generate([p for p, _ in cases], [greedy(b) for _, b in cases])
    for w, g, (_, b) in zip(want, got, cases):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids, f"budget {b}: tokens differ"
        assert g.outputs[0].thinking == w.outputs[0].thinking, f"budget {b}: thinking differs"
    assert 1 in calls, "no decode step ran compiled"
    assert max(calls) > 1, "no prompt chunk ran compiled"


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_server_answers_at_once_and_loads_cached_variants(small_model_dir, aot_cache,
                                                          tmp_path):
    """A real server with ``--compile auto`` (its default) and two of the four variants in
    the compile cache (the first test put them there): those two are ready within seconds of
    start-up (metrics), the other two compile in a child process meanwhile, a completion is
    answered, and stopping the server stops the child."""
    llm = LLM(str(small_model_dir), compile="auto")        # a no-op after the first test
    llm.engine.runner.compiled.compile_ahead(llm.engine.runner.compile_source, wait=True,
                                             variants=ROUTED)
    srv = launch(small_model_dir, tmp_path, "--compile", "auto",
                 env={"TORCHINDUCTOR_CACHE_DIR": str(aot_cache)})
    try:
        deadline = time.monotonic() + 30
        while (states := compiled_steps(srv.url)).get("rows-routed") != "ready":
            assert time.monotonic() < deadline, states
            time.sleep(0.2)
        assert states["one-row-routed"] == "ready"
        assert states["rows-budget0"] == states["one-row-budget0"] == "compiling"
        ready = {s.labels["variant"]: s.value
                 for f in text_string_to_metric_families(httpx.get(f"{srv.url}/metrics").text)
                 if f.name == "itt_compiled_step_ready_seconds" for s in f.samples}
        assert set(ready) == {"one-row-routed", "rows-routed"}
        assert all(0 < v < 30 for v in ready.values())
        children = children_of(srv.proc.pid)
        assert children, "no compile process is running"
        r = httpx.post(f"{srv.url}/v1/completions", timeout=60, json={
            "model": MODEL_NAME, "prompt": "And God said", "max_tokens": 8, "temperature": 0,
            "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    finally:
        srv.stop()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in children):
        assert time.monotonic() < deadline, "the compile process outlived the server"
        time.sleep(0.2)


def test_a_failed_compile_leaves_its_variants_eager(small_model_dir, aot_cache, prompts,
                                                    tmp_path, caplog):
    """The child cannot load the model (its path is gone): both variants are reported failed
    and logged, steps run eagerly with the reference's output."""
    llm = LLM(str(small_model_dir), max_num_seqs=8, compile="auto")
    compiled = llm.engine.runner.compiled
    for v in ROUTED:                          # not from the cache: the child must run
        aot_compile.package_path(compiled.model, compiled.cache.k, v,
                                  torch.get_num_threads()).unlink(missing_ok=True)
    compiled.compile_ahead((tmp_path / "gone", torch.float32, "none"), wait=True,
                            variants=ROUTED)
    assert set(compiled.failed) == set(ROUTED) and not compiled.variants
    assert compiled.status()["one-row-routed"] == ("failed", None)
    assert "compiling the decode step (one row) failed" in caplog.text
    calls = counting(compiled)
    check_against_reference(llm, small_model_dir, prompts[:2], [1.0])
    assert calls == []


def test_a_broken_package_is_compiled_again(small_model_dir, aot_cache, caplog):
    """A package that does not load (truncated on disk) is deleted and logged, and the
    variant goes to the compile process, not to a crash."""
    llm = LLM(str(small_model_dir), max_num_seqs=8, compile="auto")
    compiled = llm.engine.runner.compiled
    path = aot_compile.package_path(compiled.model, compiled.cache.k, ROUTED[0],
                                   torch.get_num_threads())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PK\x03\x04 not a package")
    assert not compiled._use_package(ROUTED[0], path, time.perf_counter(), "test")
    assert not path.exists() and "did not load" in caplog.text
    assert ROUTED[0] not in compiled.variants


def test_signature_follows_the_model_not_the_process(small_model_dir, tiny_model_dir):
    """The cache key is the same in another process for the same model, and differs for
    another architecture, another KV layout, another variant, or another thread count
    (every variant's fused loops, one row's matrix-vector products too, run on every
    thread)."""
    code = ("import sys; from itt_runtime.llm import LLM; from itt_runtime.runner import "
            "aot_compile as a; c = LLM(sys.argv[1], compile='auto').engine.runner.compiled; "
            "print(a.signature(c.model, c.cache.k, (True, True), 2))")
    other = subprocess.run([sys.executable, "-c", code, str(small_model_dir)],
                           capture_output=True, text=True, check=True).stdout.split()[-1]
    small = LLM(str(small_model_dir), compile="auto").engine.runner.compiled
    assert aot_compile.signature(small.model, small.cache.k, (True, True), 2) == other
    assert aot_compile.signature(small.model, small.cache.k, (True, True), 4) != other
    assert aot_compile.signature(small.model, small.cache.k, (False, True), 2) != other
    rows = aot_compile.signature(small.model, small.cache.k, (False, True), 2)
    assert aot_compile.signature(small.model, small.cache.k, (False, True), 1) != rows
    wider = LLM(str(small_model_dir), compile="auto", block_size=32).engine.runner.compiled
    assert aot_compile.signature(wider.model, wider.cache.k, (True, True), 2) != other
    big = LLM(str(tiny_model_dir), compile="auto").engine.runner.compiled
    assert aot_compile.signature(big.model, big.cache.k, (True, True), 2) != other


def test_packages_unused_for_a_month_are_pruned(monkeypatch, tmp_path):
    """``prune`` deletes packages (and unfinished ones) neither written nor loaded for
    PRUNE_AFTER_DAYS, except those it is told to keep; recent ones stay."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    cache_dir.cache_clear()
    try:
        folder = tmp_path / "aot"
        folder.mkdir()
        names = ("old", "old-but-needed", "recent", "left.123.partial")
        old, needed, recent, partial = (folder / f"{n}.pt2" for n in names)
        stale = time.time() - (aot_compile.PRUNE_AFTER_DAYS + 1) * 86400
        for path in (old, needed, recent, partial):
            path.write_bytes(b"package")
        for path in (old, needed, partial):
            os.utime(path, (stale, stale))
        assert set(aot_compile.prune({needed})) == {old, partial}
        assert sorted(p.name for p in folder.iterdir()) == ["old-but-needed.pt2", "recent.pt2"]
        assert aot_compile.prune(set()) == [needed]
    finally:
        cache_dir.cache_clear()


def test_cache_dir_is_pinned_before_inductor_picks_its_own(monkeypatch, tmp_path):
    """Inductor sets TORCHINDUCTOR_CACHE_DIR to a /tmp default the first time it looks; ours
    is resolved once and pinned there first, so the cache cannot move in mid-run."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache_dir.cache_clear()
    try:
        assert cache_dir() == tmp_path / "itt-server" / "inductor"
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache_dir())
        from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_dir
        assert inductor_dir() == str(cache_dir())
    finally:
        cache_dir.cache_clear()
