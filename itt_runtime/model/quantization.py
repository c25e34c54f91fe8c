"""Weights kept quantized for serving on CPU: ``--quantization int8``.

Every matmul weight of the model (the fused q|k|v and gate|up projections, o and down, the LM
head) is stored as int8 with one fp32 scale per output channel, and multiplied by torch's own
quantized CPU kernels (fbgemm's ``quantized::linear_dynamic``: the activations are quantized
to 8 bits at each call, the product is accumulated in int32). The embedding table is int8
rows with one scale per row, dequantized on lookup. φ, the routers and the norms stay fp32.
The routed thinking steps run the same blocks, so they use the same quantized weights.

Why this kernel (scripts/bench_quant.py, docs/benchmarks.md): on this project's CPUs (AVX2,
no AVX-512) torch's weight-only int8 and int4 matmuls and its bf16 matmul are slower than
fp32; fbgemm's dynamic int8 is the one maintained kernel that is faster. A whole-model decode
step's matmuls (SmolLM2-135M's shapes, every weight distinct so each streams from memory, one
thread) ran 1.9x / 2.1x / 1.3x faster than fp32 at 1 / 8 / 32 rows.

Batch invariance: fbgemm quantizes its input with one range for the whole tensor, so a row's
result would depend on the other rows of the batch (a request's greedy output on who else is
being served). ``Int8Linear`` makes the range fixed: each row is scaled to max |x| = 1, and
two constant columns (+1 and −1, whose weights are zero) pin the tensor's range to [−1, 1];
the row's scale is multiplied back afterwards. Each row is thus quantized on its own (per
token, as vLLM's W8A8 does), and its result is the same whatever the batch.

Not supported (refused at start-up, naming the reason): CUDA devices (fbgemm is a CPU
library), compiled CPU steps (inductor does not trace fbgemm's packed weights), a torch built
without fbgemm. The weights are quantized after the fp32 model is loaded, one block at a time,
so loading needs the fp32 model's memory once.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

MODES = ("none", "int8")


class QuantizationError(ValueError):
    """A quantization mode this build or this configuration cannot run."""


def check_supported(mode: str, device: torch.device, compiled: bool) -> None:
    """Raise QuantizationError naming why ``mode`` cannot run here (nothing for 'none')."""
    if mode == "none":
        return
    if mode not in MODES:
        raise QuantizationError(f"--quantization must be one of {', '.join(MODES)}, "
                                f"got {mode!r}")
    if device.type != "cpu":
        raise QuantizationError(f"--quantization {mode} runs on CPU only (fbgemm's kernels); "
                                f"the device is {device}")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise QuantizationError(f"--quantization {mode} needs torch's fbgemm quantized "
                                "engine, which this torch build lacks")
    if compiled:
        raise QuantizationError(f"--quantization {mode} runs eagerly: drop --compile on / "
                                "--cpu-compile (inductor cannot trace fbgemm's packed weights)")


def _per_row_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (int8 values, fp32 scales) with w ≈ values · scale."""
    w = w.detach().float()
    scale = w.abs().amax(1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """``x @ Wᵀ + b`` with W int8 per output channel (fbgemm's packed layout) and each row of
    x quantized to 8 bits on its own (see the module docstring). fp32 in, fp32 out."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        out_features, self.in_features = weight.shape
        q, scale = _per_row_int8(weight)
        # Two zero input columns: the inputs +1 and −1 that fix the quantization range.
        q = torch.cat([q, torch.zeros(out_features, 2, dtype=torch.int8)], dim=1)
        with warnings.catch_warnings():           # quantized tensors are deprecated API
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(
                q, scale.double(), torch.zeros(out_features, dtype=torch.long), 0)
            self._packed = torch.ops.quantized.linear_prepack(qw, None)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("_ends", torch.tensor([1.0, -1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x = x.reshape(-1, self.in_features).float()
        s = x.abs().amax(-1, keepdim=True).clamp(min=1e-30)
        xn = torch.cat([x / s, self._ends.expand(x.shape[0], 2)], dim=-1)
        y = torch.ops.quantized.linear_dynamic(xn, self._packed, True) * s
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape, -1)


class Int8Embedding(nn.Module):
    """An embedding table held as int8 rows with one fp32 scale per row."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        q, scale = _per_row_int8(weight)
        self.register_buffer("values", q)
        self.register_buffer("scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.values[ids].float() * self.scale[ids].unsqueeze(-1)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str) -> None:
    """Replace ``model``'s (an ITTModel, fused for serving) matmul weights and embedding by
    their ``mode`` form in place, block by block, releasing each fp32 weight as it goes."""
    if mode == "none":
        return
    for layer in model.layers:
        layer.block.quantize(Int8Linear)
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    model.head = Int8Linear(head)
    model.lm_head = None
    model.embed_tokens = Int8Embedding(model.embed_tokens.weight)


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights hold: parameters, buffers and fbgemm's packed weights."""
    total = sum(t.numel() * t.element_size() for t in model.parameters())
    total += sum(t.numel() * t.element_size() for t in model.buffers())
    for m in model.modules():
        if isinstance(m, Int8Linear):
            w, _ = torch.ops.quantized.linear_unpack(m._packed)
            total += w.numel() + w.q_per_channel_scales().numel() * 4
    return total
