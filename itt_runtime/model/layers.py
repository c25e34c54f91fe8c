"""LLaMA building blocks: RMSNorm, rotary embeddings, the pre-norm block and its residual branch.

``Block`` is split into ``project_qkv`` (norm + projections + RoPE) and ``finish`` (output
projection + MLP) so that the reference model and the paged engine share every weight and
every operation except how attention gathers its keys and values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from itt_runtime.config import ModelConfig


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


class Rotary(nn.Module):
    """cos/sin tables for RoPE (the "rotate half" layout used by LLaMA and HF)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)                      # (P, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)               # (P, D)
        self.cos: torch.Tensor
        self.sin: torch.Tensor
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


class Block(nn.Module):
    """Pre-norm LLaMA block. ``Block(x) = x + Δ(x)``; ITT layers use Δ directly."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.gate_proj = nn.Linear(d, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(d, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, d, bias=False)
        self.fused: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """For inference, once, after the weights are loaded and placed: q|k|v and gate|up
        become one weight each (one matmul instead of three and two), and the separate
        projections' weights become views into them, so every weight is held once. Moving
        the block afterwards (``.to``) would copy the views apart: fuse last."""
        if self.fused is not None:
            return
        nq, nkv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        qkv = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        gate_up = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        ffn = self.gate_proj.weight.shape[0]
        for proj, w in zip((self.q_proj, self.k_proj, self.v_proj), qkv.split([nq, nkv, nkv])):
            proj.weight = nn.Parameter(w, requires_grad=False)
        for proj, w in zip((self.gate_proj, self.up_proj), gate_up.split([ffn, ffn])):
            proj.weight = nn.Parameter(w, requires_grad=False)
        self.fused = (qkv, gate_up)

    def project_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (..., d) -> q (..., H, D), k (..., KV, D), v (..., KV, D); RoPE applied to q, k."""
        h = self.attn_norm(x)
        shape = x.shape[:-1]
        if self.fused is not None:
            nq = self.n_heads * self.head_dim
            nkv = self.n_kv_heads * self.head_dim
            q, k, v = F.linear(h, self.fused[0]).split([nq, nkv, nkv], dim=-1)
        else:
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        q = q.reshape(*shape, self.n_heads, self.head_dim)
        k = k.reshape(*shape, self.n_kv_heads, self.head_dim)
        v = v.reshape(*shape, self.n_kv_heads, self.head_dim)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Given the attention output (..., H*D) for x, return Δ(x) = Block(x) - x."""
        a = self.o_proj(attn)
        h = x + a
        m = self.mlp_norm(h)
        if self.fused is not None:
            gate, up = F.linear(m, self.fused[1]).chunk(2, dim=-1)
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
