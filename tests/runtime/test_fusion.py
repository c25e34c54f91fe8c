"""Projections are fused once at load: one q|k|v and one gate|up weight per block, the
separate projections are views into them, so a served model holds each weight once; and the
fused path computes what the separate projections compute."""

from __future__ import annotations

import torch

from itt_runtime.engine.llm_engine import EngineConfig, LLMEngine
from itt_runtime.model.loader import load_model


def resident_bytes(model) -> int:
    """Bytes of every distinct storage the model's tensors (and fused weights) live in."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t for layer in model.layers for t in (layer.block.fused or ())]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def test_served_model_holds_each_weight_once(tiny_model_dir):
    plain, _ = load_model(tiny_model_dir)
    served = LLMEngine(EngineConfig(model=str(tiny_model_dir))).model
    assert all(layer.block.fused is not None for layer in served.layers)
    assert resident_bytes(served) == resident_bytes(plain)
    block = served.layers[0].block
    qkv, gate_up = block.fused
    assert block.q_proj.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    assert block.up_proj.weight.untyped_storage().data_ptr() == \
        gate_up.untyped_storage().data_ptr()
    assert torch.equal(block.up_proj.weight, plain.layers[0].block.up_proj.weight)


def test_fused_forward_equals_unfused(tiny_model_dir):
    plain, _ = load_model(tiny_model_dir)
    fused, _ = load_model(tiny_model_dir, fuse=True)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    a, b = plain(ids), fused(ids)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert torch.equal(a.routed, b.routed)


def test_cpu_serving_stores_matmul_weights_input_major(tiny_model_dir):
    """On CPU the served fp32 weights are stored transposed, (in, out) in memory (the faster
    layout for torch's CPU BLAS, layers.input_major_view), with the values unchanged; bf16
    weights keep the usual layout (slower transposed)."""
    plain, _ = load_model(tiny_model_dir)
    served = LLMEngine(EngineConfig(model=str(tiny_model_dir))).model
    for layer, ref in zip(served.itt_layer_list, plain.itt_layer_list):
        block = layer.block
        assert block.fused is not None
        for w in (*block.fused, block.o_proj.weight, block.down_proj.weight):
            assert w.t().is_contiguous() and not w.is_contiguous()
        assert torch.equal(block.o_proj.weight, ref.block.o_proj.weight)
    assert served.embed_tokens.weight.t().is_contiguous()       # the tied LM head
    assert torch.equal(served.embed_tokens.weight, plain.embed_tokens.weight)
    bf16, _ = load_model(tiny_model_dir, dtype=torch.bfloat16, fuse=True)
    assert bf16.layers[0].block.o_proj.weight.is_contiguous()    # bf16 keeps (out, in)
