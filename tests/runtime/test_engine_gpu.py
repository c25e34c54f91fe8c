"""CUDA checks (marked gpu; skipped without a GPU): the engine on CUDA reproduces the CPU
reference in fp32 with and without CUDA graphs, bf16 stays usable, and a decode step makes
the host wait for the device once."""

from __future__ import annotations

import warnings

import pytest
import torch

from itt_runtime.llm import LLM
from itt_runtime.model.loader import load_model
from itt_runtime.sampling_params import SamplingParams

from itt_testing import reference_greedy

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = ["And God said, Let there be light: and there was light.",
           "In the beginning", "The LORD is my shepherd; I shall not want.",
           "And it came to pass, when the king heard these words, that he rent his clothes"]


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
def test_cuda_fp32_greedy_matches_cpu_reference(tiny_model_dir, enforce_eager):
    model, tok = load_model(tiny_model_dir)
    budgets = [0.0, 0.25, 0.5, 1.0]
    cases = [(p, b) for p in PROMPTS for b in budgets]
    llm = LLM(str(tiny_model_dir), device="cuda", dtype="float32",
              enforce_eager=enforce_eager)
    outs = llm.generate([tok.encode(p) for p, _ in cases],
                        [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                        think_budget=b) for _, b in cases])
    for out, (p, b) in zip(outs, cases):
        assert out.outputs[0].token_ids == reference_greedy(model, tok.encode(p), b, 12)[0], (p, b)
    graphs = llm.engine.graphs
    assert (graphs is None) == enforce_eager
    if graphs is not None:
        assert graphs.graphs and all(g.graph is not None for g in graphs.graphs.values())
    assert llm.engine.kv.pool.num_free == llm.engine.kv.pool.num_blocks


def test_cuda_bf16_batch_runs_and_frees_blocks(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), device="cuda", dtype="bfloat16")
    outs = llm.generate(["In the beginning"] * 16,
                        [SamplingParams(max_tokens=16, temperature=0.8, seed=i, ignore_eos=True,
                                        think_budget=i / 15) for i in range(16)])
    assert all(len(o.outputs[0].token_ids) == 16 for o in outs)
    assert llm.engine.kv.pool.num_free == llm.engine.kv.pool.num_blocks


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
@pytest.mark.parametrize("logprobs, expected_syncs", [(None, 1), (3, 2)])
def test_cuda_decode_step_syncs_once(tiny_model_dir, enforce_eager, logprobs, expected_syncs):
    """With routed steps masked, a greedy decode step's only synchronising call is the
    engine reading its results (counted by PyTorch's CUDA sync debug mode); asking for
    logprobs adds one read for them."""
    llm = LLM(str(tiny_model_dir), device="cuda", dtype="bfloat16",
              enforce_eager=enforce_eager, routed_compute="masked")
    eng = llm.engine
    for k, p in enumerate(PROMPTS):
        eng.add_request(str(k), eng.tokenizer.encode(p),
                        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                       think_budget=k / 3, logprobs=logprobs))
    eng.step()                                    # prompts
    eng.step()                                    # first decode step (captures a graph)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            eng.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == expected_syncs, [str(w.message) for w in syncs]
