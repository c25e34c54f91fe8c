"""model/packed_linear.py: the oneDNN matmul on packed weights and the few-rows kernel on
panels equal F.linear (up to summation order) for every row count and input shape; one row
and unpacked weights take F.linear itself; an entry goes when its weight is freed; only fp32
CPU weights are packed."""

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
    copies = 2 if packed_linear.few_rows_kernel() else 1       # 96 outputs: six panels
    assert packed_linear.pack(w) == w.numel() * 4 * copies
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    out = packed_linear.linear(x, w)
    ref = F.linear(x, w)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if x.numel() // x.shape[-1] == 1 and not packed_linear.few_rows_kernel():
        assert torch.equal(out, ref)           # one row, no kernel: F.linear itself


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
    """torch.compile sees the custom op (no graph break): the C++ one where the kernel file
    is built, so that a compiled step never enters Python for it; and the compiled call
    equals F.linear with the weight packed."""
    w = weight(seed=4)
    packed_linear.pack(w)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    fn = torch.compile(lambda x: packed_linear.linear(x, w).relu(), fullgraph=True,
                       backend=backend)
    x = torch.randn(6, 40)
    torch.testing.assert_close(fn(x), F.linear(x, w).relu(), rtol=1e-5, atol=1e-5)
    expected = packed_linear.operator().replace("::", ".")
    assert any(expected in target for target in seen), seen


kernel = pytest.mark.skipif(not packed_linear.few_rows_kernel(),
                            reason="the few-rows kernel cannot be built here")


@kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 8, 9, 16, 40, 41, 64])
@pytest.mark.parametrize("in_features", [40, 256, 688])
def test_few_rows_kernel_equals_linear(rows, in_features):
    """1 to FEW_ROWS (40) rows run the kernel on the panels (6 rows a tile: 7 and 8 take two
    tiles), more rows oneDNN; both equal F.linear."""
    w = weight(48, in_features, seed=in_features)
    packed_linear.pack(w)
    panels = packed_linear._panels[w.data_ptr()][1]
    assert panels.shape == (3, in_features, 16)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    out = packed_linear.linear(x, w)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-4, atol=1e-4)
    if rows <= packed_linear.FEW_ROWS:
        assert torch.equal(out, torch.ops.itt_kernels.few_rows_linear(x, panels))
    else:
        onednn = packed_linear._packed[w.data_ptr()][1]
        assert torch.equal(out, torch.ops.mkldnn._linear_pointwise(x, onednn, None, "none",
                                                                   [], ""))


@kernel
def test_forgotten_weight_leaves_the_operators_registry():
    """The C++ operator keeps its own registry of the copies: it runs the copies registered
    for a weight (here another weight's panels, so the answer shows which ran), and a weight
    forgotten (as when it is freed) is F.linear's again."""
    w, other = weight(64, 40, seed=7), weight(64, 40, seed=8)
    torch.ops.itt_kernels.register_weight(w, packed_linear.panels_of(other), None)
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(packed_linear.linear(x, w), F.linear(x, other), rtol=1e-5,
                               atol=1e-5)
    torch.ops.itt_kernels.forget_weight(w.data_ptr())
    assert torch.equal(packed_linear.linear(x, w), F.linear(x, w))


@kernel
def test_panels_only_for_whole_panels_and_not_asked_away():
    odd, head = weight(40, 32, seed=5), weight(64, 32, seed=6)
    assert packed_linear.pack(odd) == odd.numel() * 4           # 40 outputs: no whole panels
    assert packed_linear.pack(head, panels=False) == head.numel() * 4
    assert odd.data_ptr() not in packed_linear._panels
    assert head.data_ptr() not in packed_linear._panels
    x = torch.randn(4, 32)
    torch.testing.assert_close(packed_linear.linear(x, odd), F.linear(x, odd), rtol=1e-5,
                               atol=1e-5)


@kernel
def test_kernel_refuses_bad_arguments():
    panels = packed_linear.panels_of(weight(32, 40))
    with pytest.raises(RuntimeError, match="inner sizes differ"):
        torch.ops.itt_kernels.few_rows_linear(torch.randn(3, 41), panels)
    with pytest.raises(RuntimeError, match="fp32 only"):
        torch.ops.itt_kernels.few_rows_linear(torch.randn(3, 40).double(), panels)
    with pytest.raises(RuntimeError, match="at least one row"):
        torch.ops.itt_kernels.set_few_rows(0)
    with pytest.raises(RuntimeError, match="panels .N / 16, K, 16."):
        torch.ops.itt_kernels.register_weight(weight(32, 40), panels[:, :20], None)
