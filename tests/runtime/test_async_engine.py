"""The asyncio engine: concurrent requests, abort on early exit, errors before streaming."""

from __future__ import annotations

import asyncio

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
