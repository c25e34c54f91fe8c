"""CUDA checks (marked gpu; skipped without a GPU): the engine on CUDA reproduces the CPU
reference in fp32, and bf16 stays close."""

from __future__ import annotations

import pytest
import torch

from itt_runtime.llm import LLM
from itt_runtime.model.itt import ThresholdRouting
from itt_runtime.model.loader import load_model
from itt_runtime.sampling_params import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("budget", [0.0, 0.5, 1.0])
def test_cuda_fp32_greedy_matches_cpu_reference(tiny_model_dir, budget):
    model, tok = load_model(tiny_model_dir)
    ids = tok.encode("And God said, Let there be light: and there was light.")
    ref = list(ids)
    with torch.no_grad():
        for _ in range(8):
            out = model(torch.tensor([ref]),
                        routing=ThresholdRouting.for_budgets(model.cfg, [budget]))
            ref.append(int(out.logits[0, -1].argmax()))
    llm = LLM(str(tiny_model_dir), device="cuda", dtype="float32")
    got = llm.generate([ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                             think_budget=budget))[0].outputs[0].token_ids
    assert got == ref[len(ids):]


def test_cuda_bf16_batch_runs_and_frees_blocks(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), device="cuda", dtype="bfloat16")
    outs = llm.generate(["In the beginning"] * 16,
                        [SamplingParams(max_tokens=16, temperature=0.8, seed=i, ignore_eos=True,
                                        think_budget=i / 15) for i in range(16)])
    assert all(len(o.outputs[0].token_ids) == 16 for o in outs)
    assert llm.engine.kv.pool.num_free == llm.engine.kv.pool.num_blocks
