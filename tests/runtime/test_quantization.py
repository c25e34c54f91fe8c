"""--quantization int8 (itt_runtime/model/quantization.py): int8 weights through fbgemm's
kernels, each token's activations quantized on its own. Close to fp32, independent of the
batch a row is in (bit for bit), smaller, and refused where it cannot run."""

from __future__ import annotations

import pytest
import torch
from itt_testing import HELDOUT

from itt_runtime.llm import LLM
from itt_runtime.model.loader import load_checkpoint
from itt_runtime.model.quantization import (
    Int8Embedding,
    Int8Linear,
    QuantizationError,
    calibration_ids,
    check_supported,
    quantize_model,
    weight_bytes,
)
from itt_runtime.sampling_params import SamplingParams
from itt_runtime.training.evaluate import evaluate_budget, text_windows


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_int8_linear_is_close_to_fp32_with_and_without_bias():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 64, generator=g) * 0.05, torch.randn(96, generator=g)
    x = torch.randn(7, 3, 64, generator=g)
    assert rel_err(Int8Linear(w, b)(x), x @ w.t() + b) < 0.03
    assert rel_err(Int8Linear(w)(x), x @ w.t()) < 0.03
    assert Int8Linear(w)(x).shape == (7, 3, 96)


def test_int8_linear_row_does_not_depend_on_its_batch():
    g = torch.Generator().manual_seed(1)
    lin = Int8Linear(torch.randn(128, 64, generator=g) * 0.05)
    x = torch.randn(6, 64, generator=g)
    together = lin(x)
    alone = torch.cat([lin(x[i: i + 1]) for i in range(6)])
    assert torch.equal(together, alone)
    loud = x.clone()
    loud[1:] *= 1000.0                 # one shared range would crush row 0's resolution
    assert torch.equal(lin(loud)[0], together[0])


def test_int8_embedding_groups_of_32():
    w = torch.randn(50, 64) * 0.1
    w[3, 40] = 50.0                    # an outlier costs only its own group's precision
    emb = Int8Embedding(w)
    ids = torch.tensor([[0, 49], [7, 3]])
    assert emb(ids).shape == (2, 2, 64)
    err = (emb(ids) - w[ids]).abs()
    assert err[1, 1, :32].max() <= w[3, :32].abs().max() / 127 / 2 + 1e-7
    assert err.max() <= 50.0 / 127 / 2 + 1e-6


def test_quantized_model_perplexity_within_one_percent_of_fp32():
    fp32 = load_checkpoint(None, fuse=True).model
    q8 = load_checkpoint(None, fuse=True).model
    quantize_model(q8, "int8", calibration_ids(load_checkpoint(None).tokenizer))
    windows = text_windows(load_checkpoint(None).tokenizer, HELDOUT.read_text(), 128)[:16]
    for budget in (0.0, 1.0):
        a = evaluate_budget(fp32, windows, budget)["ppl"]
        b = evaluate_budget(q8, windows, budget)["ppl"]
        assert abs(b / a - 1) < 0.01, (budget, a, b)
    assert weight_bytes(q8) < 0.35 * weight_bytes(fp32)


def test_engine_int8_greedy_is_the_same_alone_and_in_a_batch():
    llm = LLM(model="default", quantization="int8")
    prompts = ["The king said", "In the beginning", "And the Lord spake unto Moses"]
    params = [SamplingParams(max_tokens=16, temperature=0.0, think_budget=b)
              for b in (1.0, 0.5, 0.0)]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate([p], [sp])[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    assert together == alone


def test_refusals_name_the_reason():
    with pytest.raises(QuantizationError, match="CPU only"):
        check_supported("int8", torch.device("cuda"))
    with pytest.raises(QuantizationError, match="must be one of"):
        check_supported("int4", torch.device("cpu"))
    check_supported("none", torch.device("cuda"))     # nothing to refuse
