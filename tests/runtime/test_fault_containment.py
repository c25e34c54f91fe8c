"""Fault containment in the engine: a request whose step raises fails alone, its blocks come
back, and its batch mates finish exactly as they would have; an engine that cannot run any
step raises EngineBrokenError (and the async loop reports its death). Faults are injected by
wrapping the real sampler / runner, which otherwise run unchanged."""

from __future__ import annotations

import asyncio

import pytest

from itt_runtime.engine.async_engine import AsyncLLMEngine, RequestFailedError
from itt_runtime.engine.llm_engine import EngineBrokenError, EngineConfig, LLMEngine
from itt_runtime.sampling_params import ParamError, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def run_all(engine: LLMEngine) -> dict:
    """Step until idle; {request_id: ([tokens of choice 0, of choice 1, …], error)}."""
    results: dict = {}
    while engine.has_unfinished():
        for out in engine.step():
            choices, _ = results.get(out.request_id, ({}, None))
            for c in out.outputs:
                choices[c.index] = choices.get(c.index, []) + c.token_ids
            results[out.request_id] = (choices, out.error)
    return {rid: ([c[i] for i in sorted(c)], err) for rid, (c, err) in results.items()}


def poison_sampler(engine: LLMEngine, bad_request: str) -> list[int]:
    """The sampler raises whenever ``bad_request`` is in its batch; returns call counts."""
    real, calls = engine.runner.sampler, [0]

    def sampler(logits, seqs, *rest):
        calls[0] += 1
        if any(s.request_id == bad_request for s in seqs):
            raise RuntimeError("injected sampler fault")
        return real(logits, seqs, *rest)
    engine.runner.sampler = sampler
    return calls


@pytest.fixture()
def engine(tiny_model_dir):
    return LLMEngine(EngineConfig(model=str(tiny_model_dir), kv_cache_memory=8 * 2**20))


def test_failing_request_fails_alone_and_frees_its_blocks(engine, tiny_model_dir):
    ids = engine.tokenizer.encode("In the beginning")
    clean = LLMEngine(EngineConfig(model=str(tiny_model_dir), kv_cache_memory=8 * 2**20))
    for rid in ("a", "b"):
        clean.add_request(rid, ids, GREEDY)
    expected = run_all(clean)

    free_before = engine.kv.pool.num_free
    poison_sampler(engine, "bad")
    engine.add_request("a", ids, GREEDY)
    engine.add_request("bad", ids, SamplingParams(max_tokens=6, temperature=1.0, n=2, seed=1))
    engine.add_request("b", ids, GREEDY)
    results = run_all(engine)

    assert results["bad"][1] is not None and "injected sampler fault" in results["bad"][1]
    assert results["bad"][0] == []
    for rid in ("a", "b"):                       # batch mates: the same tokens, no error
        assert results[rid] == (expected[rid][0], None)
    assert engine.kv.pool.num_free == free_before and engine.kv.num_sequences == 0
    assert not engine.requests

    engine.add_request("after", ids, GREEDY)    # and the engine goes on serving
    assert run_all(engine)["after"] == (expected["a"][0], None)


def test_engine_that_cannot_step_raises_broken(engine):
    def runner_fault(batch):
        raise RuntimeError("injected runner fault")
    engine.runner.forward.execute = runner_fault
    engine.add_request("a", engine.tokenizer.encode("In the beginning"), GREEDY)
    with pytest.raises(EngineBrokenError, match="injected runner fault"):
        engine.step()


def test_async_engine_reports_death_and_fails_requests(tiny_model_dir):
    eng = AsyncLLMEngine(EngineConfig(model=str(tiny_model_dir), kv_cache_memory=8 * 2**20))
    deaths = []
    eng.death_callbacks.append(deaths.append)

    def runner_fault(batch):
        raise RuntimeError("injected runner fault")
    eng.engine.runner.forward.execute = runner_fault
    eng.start()
    try:
        async def one():
            async for _ in eng.generate([1, 5, 6], GREEDY, "x"):
                pass
        with pytest.raises(Exception) as e:
            asyncio.run(one())
        assert type(e.value).__name__ == "EngineDeadError"
        eng._thread.join(5)
        assert not eng.is_alive and len(deaths) == 1
        assert isinstance(deaths[0], EngineBrokenError)
    finally:
        eng.shutdown()


def test_async_engine_fails_one_request_and_serves_the_next(tiny_model_dir):
    eng = AsyncLLMEngine(EngineConfig(model=str(tiny_model_dir), kv_cache_memory=8 * 2**20))
    poison_sampler(eng.engine, "bad")
    eng.start()
    try:
        async def collect(rid):
            tokens = []
            async for out in eng.generate([1, 5, 6], GREEDY, rid):
                tokens += out.outputs[0].token_ids
            return tokens

        async def main():
            return await asyncio.gather(collect("good"), collect("bad"), collect("good2"),
                                        return_exceptions=True)
        good, bad, good2 = asyncio.run(main())
        assert isinstance(bad, RequestFailedError)
        assert good == good2 and len(good) == 6
        assert eng.is_alive
    finally:
        eng.shutdown()


@pytest.mark.parametrize("params, param", [
    (dict(stop_token_ids=[8192]), "stop_token_ids"),
    (dict(stop_token_ids=[2**70]), "stop_token_ids"),
    (dict(seed=2**64), "seed"),
    (dict(seed=-2**63 - 1), "seed"),
    (dict(stop_token_ids=list(range(1025))), "stop_token_ids"),
])
def test_out_of_range_parameters_are_refused_before_scheduling(engine, params, param):
    with pytest.raises(ParamError) as e:
        engine.add_request("r", [1, 5], SamplingParams(max_tokens=4, min_tokens=2, **params))
    assert e.value.param == param
    assert not engine.has_unfinished() and not engine.requests


def test_largest_seed_with_n_2_runs_both_children(engine):
    """(seed + i) mod 2**64: the second child of seed 2**64 - 1 takes seed 0."""
    params = SamplingParams(max_tokens=4, temperature=1.0, n=2, seed=2**64 - 1,
                            ignore_eos=True)
    engine.add_request("r", [1, 5, 6], params)
    choices, error = run_all(engine)["r"]
    assert error is None and [len(c) for c in choices] == [4, 4]
    engine.add_request("s", [1, 5, 6], SamplingParams(max_tokens=4, temperature=1.0, seed=0,
                                                       ignore_eos=True))
    assert run_all(engine)["s"] == ([choices[1]], None)
