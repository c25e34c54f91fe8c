"""LLaMA building blocks: RMSNorm, rotary embeddings, the pre-norm block and its residual branch.

``Block`` is split into ``project_qkv`` (norm + projections + RoPE) and ``finish`` (output
projection + MLP) so that the reference model and the paged engine share every weight and
every operation except how attention gathers its keys and values.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from itt_runtime.config import ModelConfig, RopeScaling
from itt_runtime.model import packed_linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:                  # one fused kernel, same arithmetic
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in fp32 like LLaMA; cast back before the weight, as HF does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float,
                  scaling: RopeScaling | None = None) -> torch.Tensor:
    """RoPE's inverse frequencies (D/2,), fp32, with the checkpoint's frequency scaling.

    ``llama3`` (Llama 3.1/3.2): with L = original_max_position_embeddings, a frequency whose
    wavelength 2π/f is longer than L/low_freq_factor is divided by ``factor``; one shorter
    than L/high_freq_factor is kept; in between it is blended, with the weight of the kept
    frequency rising linearly in L/wavelength from low_freq_factor to high_freq_factor.
    Same fp32 operations as transformers, so the tables agree to the last bit."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":          # positions divided by factor, equivalently
        return inv_freq / scaling.factor
    assert scaling.rope_type == "llama3", scaling.rope_type      # ModelConfig validated it
    assert scaling.low_freq_factor is not None and scaling.high_freq_factor is not None
    assert scaling.original_max_position_embeddings is not None
    factor, lo, hi = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_len = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    long_wave = wavelen > old_len / lo                                   # divided by factor
    short_wave = wavelen < old_len / hi                                  # kept
    scaled = torch.where(long_wave, inv_freq / factor, inv_freq)
    keep = (old_len / wavelen - lo) / (hi - lo)                          # 0 … 1 in between
    blended = (1 - keep) * scaled / factor + keep * scaled
    return torch.where(~short_wave & ~long_wave, blended, scaled)


class Rotary(nn.Module):
    """cos/sin tables for RoPE (the "rotate half" layout used by LLaMA and HF)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: RopeScaling | None = None) -> None:
        super().__init__()
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        if torch.get_default_device().type == "meta":
            # Shapes only, for a model built on the meta device (the loader builds the real
            # tables); computing them there would load torch's meta kernels for seconds.
            for name in ("cos", "sin"):
                self.register_buffer(name, torch.empty(max_positions, head_dim),
                                     persistent=False)
            return
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)                      # (P, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)               # (P, D)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions (...,) -> cos, sin (..., 1, D) ready to broadcast over heads."""
        return (self.cos[positions].to(dtype).unsqueeze(-2),
                self.sin[positions].to(dtype).unsqueeze(-2))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., H, D); cos/sin (..., 1, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def input_major_view(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in) with the same values, stored as its transpose: (in, out) rows in
    memory, seen through an (out, in) view. ``F.linear(x, w)`` on such a view computes
    ``x @ wᵀ`` with wᵀ contiguous, which torch's CPU BLAS (MKL, AVX2) runs faster than the
    usual layout: 1.2-1.4x for one row per matmul, 1.0-1.25x for 32 rows, on this project's
    shapes; and a decode step that streams every weight once per token gains most
    (docs/perf-notes.md, 2026-11-30 night). Results differ only by summation order. For
    fp32 only: torch's CPU bf16 matmul is about 7x slower on this layout."""
    return weight.detach().t().contiguous().t()


class Block(nn.Module):
    """Pre-norm LLaMA block. ``Block(x) = x + Δ(x)``; ITT layers use Δ directly."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        qkv_bias = cfg.qkv_bias or cfg.o_bias                # o_bias: Llama's attention_bias
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=cfg.o_bias)
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.gate_proj = nn.Linear(d, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(d, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, d, bias=False)
        # After fuse_projections: the q|k|v and gate|up weights (and q|k|v biases). Buffers
        # that are not saved, so that every tensor the forward reads has a module name (an
        # AOT-compiled step, runner/aot_compile.py, is handed the model's tensors by name).
        self.fused_qkv: torch.Tensor | None
        self.fused_gate_up: torch.Tensor | None
        self.fused_qkv_bias: torch.Tensor | None
        for name in ("fused_qkv", "fused_gate_up", "fused_qkv_bias"):
            self.register_buffer(name, None, persistent=False)
        # --quantization (model/quantization.py): the q|k|v and gate|up matmuls as modules.
        self.quantized: nn.ModuleList | None = None

    @property
    def fused(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The fused (q|k|v, gate|up) weights; None before ``fuse_projections`` (and after
        ``quantize``)."""
        if self.fused_qkv is None or self.fused_gate_up is None:
            return None
        return self.fused_qkv, self.fused_gate_up

    @torch.no_grad()
    def fuse_projections(self, input_major: bool = False) -> None:
        """For inference, once, after the weights are loaded and placed: q|k|v and gate|up
        become one weight each (one matmul instead of three and two), and the separate
        projections' weights become views into them, so every weight is held once (q|k|v
        biases likewise). Moving the block afterwards (``.to``) would copy the views apart:
        fuse last.

        ``input_major`` (CPU): every projection weight is stored transposed, (in, out) in
        memory, and the (out, in) parameter is a view of it (``input_major_view``)."""
        if self.fused is not None:
            return
        nq, nkv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        layout = input_major_view if input_major else (lambda w: w)
        qkv = layout(torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
        gate_up = layout(torch.cat([self.gate_proj.weight, self.up_proj.weight]))
        if input_major:
            for proj in (self.o_proj, self.down_proj):
                proj.weight = nn.Parameter(input_major_view(proj.weight), requires_grad=False)
        ffn = self.gate_proj.weight.shape[0]
        for proj, w in zip((self.q_proj, self.k_proj, self.v_proj), qkv.split([nq, nkv, nkv])):
            proj.weight = nn.Parameter(w, requires_grad=False)
        for proj, w in zip((self.gate_proj, self.up_proj), gate_up.split([ffn, ffn])):
            proj.weight = nn.Parameter(w, requires_grad=False)
        if self.q_proj.bias is not None:
            bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
            for proj, b in zip((self.q_proj, self.k_proj, self.v_proj),
                               bias.split([nq, nkv, nkv])):
                proj.bias = nn.Parameter(b, requires_grad=False)
            self.fused_qkv_bias = bias
        self.fused_qkv, self.fused_gate_up = qkv, gate_up

    @torch.no_grad()
    def quantize(self, make: Callable[[torch.Tensor, torch.Tensor | None], nn.Module]) -> None:
        """For serving with ``--quantization`` (model/quantization.py), after
        ``fuse_projections``: q|k|v, gate|up, o and down become ``make(weight, bias)``
        modules, and the fp32 projections are released."""
        if self.fused is None:
            raise RuntimeError("quantize() needs fuse_projections() first")
        qkv, gate_up = self.fused
        self.quantized = nn.ModuleList([make(qkv, self.fused_qkv_bias), make(gate_up, None)])
        # Quantized modules stand where the Linears were (they are called the same way).
        self.o_proj = make(self.o_proj.weight, self.o_proj.bias)  # type: ignore[assignment]
        self.down_proj = make(self.down_proj.weight, None)  # type: ignore[assignment]
        for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            delattr(self, name)
        self.fused_qkv = self.fused_gate_up = self.fused_qkv_bias = None

    def replace_quantized(self, fn: Callable[[nn.Module], nn.Module]) -> None:
        """After ``quantize``: each of the four matmul modules becomes ``fn(module)``."""
        if self.quantized is None:
            raise RuntimeError("replace_quantized() needs quantize() first")
        self.quantized = nn.ModuleList(fn(m) for m in self.quantized)
        self.o_proj = fn(self.o_proj)  # type: ignore[assignment]
        self.down_proj = fn(self.down_proj)  # type: ignore[assignment]

    def project_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    packed: bool = False):
        """x (..., d) -> q (..., H, D), k (..., KV, D), v (..., KV, D); RoPE applied to q, k.
        ``packed``: the fused q|k|v matmul through packed_linear (as ``finish``)."""
        h = self.attn_norm(x)
        shape = x.shape[:-1]
        nq, nkv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if self.quantized is not None:
            q, k, v = self.quantized[0](h).split([nq, nkv, nkv], dim=-1)
        elif self.fused_qkv is not None:
            matmul = packed_linear.linear if packed else F.linear
            q, k, v = matmul(h, self.fused_qkv, self.fused_qkv_bias).split([nq, nkv, nkv],
                                                                          dim=-1)
        else:
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        q = q.reshape(*shape, self.n_heads, self.head_dim)
        k = k.reshape(*shape, self.n_kv_heads, self.head_dim)
        v = v.reshape(*shape, self.n_kv_heads, self.head_dim)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def finish(self, x: torch.Tensor, attn: torch.Tensor, packed: bool = False) -> torch.Tensor:
        """Given the attention output (..., H*D) for x, return Δ(x) = Block(x) - x.
        ``packed``: the output, gate|up and down matmuls through packed_linear (compiled CPU
        steps; fused weights only)."""
        if packed and self.quantized is None:
            a = packed_linear.linear(attn, self.o_proj.weight, self.o_proj.bias)
        else:
            a = self.o_proj(attn)
        h = x + a
        m = self.mlp_norm(h)
        if self.quantized is not None:
            gate, up = self.quantized[1](m).chunk(2, dim=-1)
        elif self.fused_gate_up is not None:
            matmul = packed_linear.linear if packed else F.linear     # down_proj has no bias
            gate, up = matmul(m, self.fused_gate_up).chunk(2, dim=-1)
            return a + matmul(F.silu(gate) * up, self.down_proj.weight)
        else:
            gate, up = self.gate_proj(m), self.up_proj(m)
        return a + self.down_proj(F.silu(gate) * up)

    def delta(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
        """Full-sequence Δ(x). x (B, T, d); mask (B, 1, T, T) bool or None for plain causal."""
        q, k, v = self.project_qkv(x, cos, sin)                   # (B, T, H|KV, D)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))           # (B, H|KV, T, D)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        o = o.transpose(1, 2).reshape(*x.shape[:-1], self.n_heads * self.head_dim)
        return self.finish(x, o)
