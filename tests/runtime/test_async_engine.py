"""The asyncio engine: concurrent requests, abort on early exit, errors before streaming."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from itt_runtime.engine.async_engine import AsyncLLMEngine
from itt_runtime.engine.llm_engine import EngineConfig
from itt_runtime.llm import LLM
from itt_runtime.sampling_params import ParamError, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = AsyncLLMEngine(EngineConfig(model=str(tiny_model_dir)))
    eng.start()
    yield eng
    eng.shutdown()


async def collect(engine, ids, params, rid):
    tokens, text, last = [], "", None
    async for out in engine.generate(ids, params, rid):
        for c in out.outputs:
            tokens += c.token_ids
            text += c.text
        last = out
    return tokens, text, last


def test_concurrent_budgets_equal_offline_results(engine, tiny_model_dir):
    ids = engine.tokenizer.encode("The LORD is my shepherd")
    budgets = [0.0, 0.3, 0.6, 1.0]

    async def main():
        return await asyncio.gather(*[
            collect(engine, ids, SamplingParams(max_tokens=10, temperature=0, think_budget=b,
                                                ignore_eos=True), f"c{k}")
            for k, b in enumerate(budgets)])

    results = asyncio.run(main())
    llm = LLM(str(tiny_model_dir))
    for b, (tokens, text, last) in zip(budgets, results):
        alone = llm.generate([ids], SamplingParams(max_tokens=10, temperature=0, think_budget=b,
                                                   ignore_eos=True))[0].outputs[0]
        assert tokens == alone.token_ids and text == alone.text
        assert last.finished and last.think_budget == b


def test_leaving_the_stream_aborts_and_frees_blocks(engine):
    ids = engine.tokenizer.encode("In the beginning")

    async def main():
        agen = engine.generate(ids, SamplingParams(max_tokens=400, ignore_eos=True), "gone")
        async for _ in agen:
            break
        await agen.aclose()
        for _ in range(100):
            await asyncio.sleep(0.02)
            s = engine.stats()
            if s.num_running == 0 and s.kv_usage == 0.0:
                return s
        return engine.stats()

    s = asyncio.run(main())
    assert s.num_running == 0 and s.num_waiting == 0 and s.kv_usage == 0.0


def test_invalid_request_raises_before_streaming(engine):
    async def main():
        async for _ in engine.generate([], SamplingParams(), "bad"):
            pass

    with pytest.raises(ParamError):
        asyncio.run(main())
    assert engine.is_alive


def test_the_engine_is_built_and_stepped_on_its_own_thread(engine, caplog):
    # Loading on one thread and stepping on another keeps two OpenMP teams, which made small
    # operators 2-4x slower (async_engine's docstring).
    engine_thread = engine.call(threading.get_ident)
    assert engine_thread != threading.get_ident()
    assert engine.engine.built_on == engine_thread

    async def main():
        return await collect(engine, engine.tokenizer.encode("In the beginning"),
                             SamplingParams(max_tokens=3, ignore_eos=True), "own-thread")

    with caplog.at_level(logging.WARNING, logger="itt_runtime"):
        tokens, _, _ = asyncio.run(main())
    assert len(tokens) == 3
    assert not [r for r in caplog.records if "another thread" in r.getMessage()]


def test_call_hands_back_the_result_or_the_exception(engine):
    assert engine.call(lambda: 6 * 7) == 42
    with pytest.raises(ZeroDivisionError):
        engine.call(lambda: 1 / 0)
    assert engine.is_alive


def test_a_model_that_fails_to_load_raises_and_stops_the_thread(tmp_path):
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(Exception, match="nowhere"):
        AsyncLLMEngine(EngineConfig(model=str(tmp_path / "nowhere")))
    for _ in range(50):
        left = [t for t in threading.enumerate()
                if t.ident not in before and t.name == "itt-engine"]
        if not left:
            break
        time.sleep(0.02)
    assert not left


def test_stepping_on_another_thread_than_the_builder_warns_once(tiny_model_dir, caplog):
    llm = LLM(str(tiny_model_dir))
    ids = llm.tokenizer.encode("In the beginning")

    def run(rid):
        llm.engine.add_request(rid, ids, SamplingParams(max_tokens=2, ignore_eos=True))
        while llm.engine.has_unfinished():
            llm.engine.step()

    with caplog.at_level(logging.WARNING, logger="itt_runtime"):
        run("same-thread")
        assert not [r for r in caplog.records if "another thread" in r.getMessage()]
        for rid in ("other-1", "other-2"):
            t = threading.Thread(target=run, args=(rid,))
            t.start()
            t.join()
    assert len([r for r in caplog.records if "another thread" in r.getMessage()]) == 1
