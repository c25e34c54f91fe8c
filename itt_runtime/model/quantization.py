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

Compiled steps (``--compile``): inductor cannot trace fbgemm's packed weights (a C++ object,
not a tensor), so inside a traced step the product is ``torch.ops.itt.int8_linear(x, key)``, a
custom operator that compiled code calls as one opaque op, and ``key`` a one-element tensor
buffer of the module whose value names its packed weights in a registry (a value, not an
address: a compiled step may copy its constants). The quantization and scaling around it
fuse into the step's loops. Eager steps call fbgemm directly.

Not supported (refused at start-up, naming the reason): CUDA devices (fbgemm is a CPU
library), a torch built without fbgemm. The weights are quantized after the fp32 model is
loaded, one block at a time, so loading needs the fp32 model's memory once.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from itt_runtime.model.itt import ITTModel, ThresholdRouting

MODES = ("none", "int8")


class QuantizationError(ValueError):
    """A quantization mode this build or this configuration cannot run."""


def check_supported(mode: str, device: torch.device) -> None:
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


def _per_row_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (int8 values, fp32 scales) with w ≈ values · scale."""
    w = w.detach().float()
    scale = w.abs().amax(1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


# key -> fbgemm's packed weights of one Int8Linear (module docstring). An entry is removed
# when its module is freed.
_packed_by_key: dict[int, Any] = {}
_keys = itertools.count(1)
_registry_lock = threading.Lock()


@torch.library.custom_op("itt::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, key: torch.Tensor, out_features: int) -> torch.Tensor:
    """fbgemm's ``quantized::linear_dynamic`` of x (rows, in) on the packed weights that
    ``key`` (a one-element int64 tensor) names; (rows, out_features) fp32."""
    return torch.ops.quantized.linear_dynamic(x, _packed_by_key[int(key.item())], True)


@int8_linear.register_fake
def _(x: torch.Tensor, key: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


def _forget(key: int) -> None:
    with _registry_lock:
        _packed_by_key.pop(key, None)


class Int8Linear(nn.Module):
    """``x @ Wᵀ + b`` with W int8 per output channel (fbgemm's packed layout) and each row of
    x quantized to 8 bits on its own (see the module docstring). fp32 in, fp32 out.

    ``act_amax`` (in_features,): the largest |x| seen per input channel on calibration text.
    With it, each channel c is scaled by s_c = sqrt(act_amax_c / w_amax_c) — x_c / s_c in,
    W[:, c] · s_c in the weight (SmoothQuant's migration, α = 0.5) — which moves the outlier
    channels' range from the activations, quantized per token, into the weights, quantized
    per channel, where it costs less precision."""

    inv_smooth: torch.Tensor | None
    bias: torch.Tensor | None
    _ends: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 act_amax: torch.Tensor | None = None) -> None:
        super().__init__()
        out_features, self.in_features = weight.shape
        weight = weight.detach().float()
        smooth = None
        if act_amax is not None:
            w_amax = weight.abs().amax(0).clamp(min=1e-5)
            smooth = (act_amax.float().clamp(min=1e-5) / w_amax).sqrt().clamp(1e-2, 1e2)
            weight = weight * smooth
        self.register_buffer("inv_smooth", None if smooth is None else 1.0 / smooth)
        q, scale = _per_row_int8(weight)
        # Two zero input columns: the inputs +1 and −1 that fix the quantization range.
        q = torch.cat([q, torch.zeros(out_features, 2, dtype=torch.int8)], dim=1)
        with warnings.catch_warnings():           # quantized tensors are deprecated API
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(
                q, scale.double(), torch.zeros(out_features, dtype=torch.long), 0)
            packed = torch.ops.quantized.linear_prepack(qw, None)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("_ends", torch.tensor([1.0, -1.0]))
        self.out_features = out_features
        # The packed weights live in the registry only: torch.export refuses a module that
        # holds fbgemm's C++ object as an attribute.
        self.key = next(_keys)
        with _registry_lock:
            _packed_by_key[self.key] = packed
        weakref.finalize(self, _forget, self.key)
        self.register_buffer("_key", torch.tensor([self.key], dtype=torch.long))

    @property
    def packed(self) -> Any:
        """fbgemm's packed weights (``quantized::linear_prepack``)."""
        return _packed_by_key[self.key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x = x.reshape(-1, self.in_features).float()
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        s = x.abs().amax(-1, keepdim=True).clamp(min=1e-30)
        xn = torch.cat([x / s, self._ends.expand(x.shape[0], 2)], dim=-1)
        if torch.compiler.is_compiling():       # traced: the opaque op (module docstring)
            y = torch.ops.itt.int8_linear(xn, self._key, self.out_features) * s
        else:
            y = torch.ops.quantized.linear_dynamic(xn, self.packed, True) * s
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape, -1)


class _Observed(nn.Module):
    """An fp32 linear that records the largest |x| per input channel (calibration)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias
        self.amax = torch.zeros(weight.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0]:
            self.amax = torch.maximum(self.amax, flat.abs().amax(0).float())
        return F.linear(x, self.weight, self.bias)


class Int8Embedding(nn.Module):
    """An embedding table held as int8 with one fp32 scale per ``group`` consecutive values
    of a row (llama.cpp's Q8_0 layout: a row's outlier dimension costs only its group
    precision), dequantized on lookup."""

    values: torch.Tensor
    scale: torch.Tensor

    def __init__(self, weight: torch.Tensor, group: int = 32) -> None:
        super().__init__()
        V, d = weight.shape
        self.group = group if d % group == 0 else d
        q, scale = _per_row_int8(weight.detach().reshape(-1, self.group))
        self.register_buffer("values", q.reshape(V, d))
        self.register_buffer("scale", scale.reshape(V, d // self.group))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.values[ids].float().unflatten(-1, (-1, self.group))
        return (q * self.scale[ids].unsqueeze(-1)).flatten(-2)


@torch.no_grad()
def quantize_model(model: ITTModel, mode: str, calibration_ids: torch.Tensor) -> None:
    """Replace ``model``'s (an ITTModel, fused for serving) matmul weights and embedding by
    their ``mode`` form in place. ``calibration_ids`` (B, T): text the model reads once, in
    fp32 at full think budget (every routed step runs), to measure each projection's input
    range per channel (``Int8Linear``'s smoothing); then each block's fp32 weights are
    replaced and released."""
    if mode == "none":
        return
    for layer in model.itt_layer_list:
        layer.block.quantize(_Observed)
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    model.head = _Observed(head)
    routing = ThresholdRouting.for_budgets(model.cfg, [1.0] * len(calibration_ids)) \
        if model.cfg.is_itt else None
    model(calibration_ids, routing=routing)

    def swap(obs: nn.Module) -> Int8Linear:
        assert isinstance(obs, _Observed)
        return Int8Linear(obs.weight, obs.bias, obs.amax)

    for layer in model.itt_layer_list:
        layer.block.replace_quantized(swap)
    model.head = swap(model.head)
    model.lm_head = None
    # Looked up the way nn.Embedding is (model(ids), decode steps): the int8 table stands in.
    model.embed_tokens = Int8Embedding(model.embed_tokens.weight)  # type: ignore[assignment]
    release_freed_memory()


def release_freed_memory() -> None:
    """Hand the freed fp32 weights' pages back to the OS. glibc keeps freed blocks below its
    (adaptive, up to 32 MB) mmap threshold in the heap, so without this the process's
    resident memory would stay near the fp32 model's."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):       # not glibc: nothing to do
        pass


CALIBRATION_TEXT = Path(__file__).with_name("calibration.txt")


def calibration_ids(tok, max_tokens: int = 512) -> torch.Tensor:
    """(1, T) token ids of the packaged calibration text (``calibration.txt``: general English
    prose, not the held-out text any evaluation reads), BOS first where the tokenizer adds
    one, at most ``max_tokens``."""
    ids = tok.encode(CALIBRATION_TEXT.read_text(encoding="utf-8"))[:max_tokens]
    return torch.tensor([ids])


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights hold: parameters, buffers and fbgemm's packed weights."""
    # Views share storage (fused weights and the projections' views of them): count each
    # storage once.
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (*model.parameters(), *model.buffers())}
    total = sum(storages.values())
    for m in model.modules():
        if isinstance(m, Int8Linear):
            w, _ = torch.ops.quantized.linear_unpack(m.packed)
            total += w.numel() + w.q_per_channel_scales().numel() * 4
    return total
