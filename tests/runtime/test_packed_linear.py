"""model/packed_linear.py: the oneDNN matmul on packed weights equals F.linear (up to
summation order) for every row count and input shape; one row and unpacked weights take
F.linear itself; an entry goes when its weight is freed; only fp32 CPU weights are packed."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from itt_runtime.model import packed_linear
from itt_runtime.model.layers import input_major_view

pytestmark = pytest.mark.skipif(not packed_linear.available(), reason="torch without oneDNN")


def weight(out_features: int = 96, in_features: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return input_major_view(torch.randn(out_features, in_features, generator=g))


@pytest.mark.parametrize("shape", [(1, 40), (2, 40), (8, 40), (33, 40), (3, 5, 40), (1, 1, 40)])
def test_packed_matmul_equals_linear(shape):
    w = weight()
    assert packed_linear.pack(w) == w.numel() * 4
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    out = packed_linear.linear(x, w)
    ref = F.linear(x, w)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if x.numel() // x.shape[-1] == 1:          # one row: F.linear itself, bit for bit
        assert torch.equal(out, ref)


def test_unpacked_weight_is_plain_linear():
    w = weight(seed=2)
    x = torch.randn(8, 40)
    assert not packed_linear.is_packed(w)
    assert torch.equal(packed_linear.linear(x, w), F.linear(x, w))


def test_packing_twice_adds_nothing_and_freeing_forgets():
    w = weight(seed=3)
    assert packed_linear.pack(w) > 0
    assert packed_linear.pack(w) == 0
    key = w.data_ptr()
    assert key in packed_linear._packed
    del w
    gc.collect()
    assert key not in packed_linear._packed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_only_fp32_weights_are_packed(dtype):
    with pytest.raises(ValueError, match="only fp32 CPU weights"):
        packed_linear.pack(weight().to(dtype))


def test_traced_call_is_one_opaque_op():
    """torch.compile sees the custom op (no graph break), and the compiled call equals
    F.linear with the weight packed."""
    w = weight(seed=4)
    packed_linear.pack(w)
    fn = torch.compile(lambda x: packed_linear.linear(x, w).relu(), fullgraph=True,
                       backend="aot_eager")
    x = torch.randn(6, 40)
    torch.testing.assert_close(fn(x), F.linear(x, w).relu(), rtol=1e-5, atol=1e-5)
