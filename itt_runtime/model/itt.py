"""The reference ITT model: docs/ITT_SPEC.md as a plain full-sequence computation, no cache.

Reads top to bottom like the spec:

    y_0 = x + φ_0 ⊙ Δ(x)                          base step, every token
    for t in 1 … S−1:                              routed thinking steps
        s_t = sigmoid(r_t(y_{t−1}))
        M_t = routing.select(...)                  top-k (training) or s_t > τ (causal)
        y_t[i] = y_{t−1}[i] + s_t[i] · φ_t ⊙ Δ(y_{t−1})[i]   for routed i, computed on
                 the routed tokens only (they attend to each other, causally, at their
                 original RoPE positions); unrouted tokens are carried over.

Every optimised path (the paged engine) is tested against this file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from itt_runtime.config import ModelConfig
from itt_runtime.model import packed_linear
from itt_runtime.model.layers import Block, RMSNorm, Rotary


# ---- routing rules ------------------------------------------------------------------------
class Routing:
    """Chooses the routed tokens at one routed step. ``stream`` is the routed stream index
    (``ModelConfig.routed_stream_index``); ``logits`` (B, T) are the router's pre-sigmoid
    outputs. Comparing logits is the same rule as comparing s = sigmoid(logit), but it stays
    exact where fp32 sigmoid saturates to 1.0 (trained routers often push scores there)."""

    def select(self, stream: int, logits: torch.Tensor) -> torch.Tensor:  # (B, T) bool
        raise NotImplementedError


class TopKRouting(Routing):
    """Paper mode: the top ceil(ρ·n) tokens of each sequence. Not causal."""

    def __init__(self, capacity: float) -> None:
        self.capacity = capacity

    def select(self, stream: int, logits: torch.Tensor) -> torch.Tensor:
        k = math.ceil(self.capacity * logits.shape[1])
        idx = logits.topk(k, dim=1).indices
        return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, idx, True)


class ThresholdRouting(Routing):
    """Causal mode: route iff logit > θ (θ = logit(τ)), one θ per sequence and routed stream,
    or per position and routed stream (a budget per token, as elastic thinking applies)."""

    def __init__(self, thresholds: torch.Tensor, n_layers: int) -> None:
        self.thresholds = thresholds        # (B, n_routed_streams) or (B, T, n_routed_streams)
        self.n_layers = n_layers

    @classmethod
    def for_position_budgets(cls, cfg: ModelConfig, budgets: list[list[float]], device=None):
        """``budgets[b][i]``: the budget position i of sequence b is computed at."""
        tau = torch.tensor([[cfg.thresholds_for(x) for x in row] for row in budgets],
                           dtype=torch.float32, device=device)
        return cls(tau.reshape(len(budgets), len(budgets[0]), cfg.max_extra_steps),
                   cfg.n_layers)

    @classmethod
    def for_budgets(cls, cfg: ModelConfig, budgets: list[float], device=None):
        tau = torch.tensor([cfg.thresholds_for(b) for b in budgets], dtype=torch.float32,
                           device=device).reshape(len(budgets), cfg.max_extra_steps)
        return cls(tau, cfg.n_layers)

    def select(self, stream: int, logits: torch.Tensor) -> torch.Tensor:
        theta = self.thresholds[..., stream - self.n_layers]             # (B,) or (B, T)
        return logits.float() > (theta[:, None] if theta.dim() == 1 else theta)


@dataclass
class ModelOutput:
    logits: torch.Tensor                 # (B, T, vocab) fp32
    routed: torch.Tensor | None          # (B, T, n_routed_streams) bool, None for dense
    hidden: torch.Tensor | None = None   # (B, T, d) final hidden states, when asked for

    @property
    def extra_steps(self) -> torch.Tensor:
        """Per-token extra block applications (B, T)."""
        if self.routed is None:
            return torch.zeros(self.logits.shape[:2], dtype=torch.long)
        return self.routed.sum(-1)


# ---- the model ----------------------------------------------------------------------------
class ITTLayer(nn.Module):
    """A dense layer (think_steps == 1 or not listed in itt_layers) or an ITT layer ×S."""

    def __init__(self, cfg: ModelConfig, think_steps: int) -> None:
        super().__init__()
        self.block = Block(cfg)
        self.think_steps = think_steps
        if think_steps > 1:
            self.phi = nn.Parameter(torch.ones(think_steps, cfg.d_model))   # φ_0 … φ_{S−1}
            self.routers = nn.ModuleList(nn.Linear(cfg.d_model, 1) for _ in range(think_steps - 1))

    def base_update(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """y_0 = x + φ_0 ⊙ Δ(x); a dense layer is x + Δ(x). ``delta`` is Δ(x)."""
        return x + delta if self.think_steps == 1 else x + self.phi[0] * delta

    def routed_increment(self, step: int, score: torch.Tensor,
                         delta: torch.Tensor) -> torch.Tensor:
        """s_t · φ_t ⊙ Δ(y_{t−1}) of routed tokens: score (...,), delta (..., d). The caller
        adds it to the routed tokens' y_{t−1} (unrouted tokens are carried over)."""
        return score.to(delta.dtype)[..., None] * (self.phi[step] * delta)

    def router_logits(self, step: int, y: torch.Tensor) -> torch.Tensor:
        """r_t(y_{t−1}), (..., d) -> (...,); the score is s_t = sigmoid of this."""
        return self.routers[step - 1](y).squeeze(-1)


class ITTModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        itt = set(cfg.itt_layers)
        self.layers = nn.ModuleList(
            ITTLayer(cfg, cfg.think_steps if i in itt else 1) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size,
                                                                 bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                             cfg.rope_scaling)
        # The LM head as a module, when --quantization replaced the weight (quantization.py).
        self.head: nn.Module | None = None
        self.history: list[dict] = []       # training log, set by the trainer
        self.finished = True                # False: a training run stopped early

    @property
    def itt_layer_list(self) -> list[ITTLayer]:
        """``layers`` with their type (nn.ModuleList yields plain Modules to a type checker)."""
        return cast(list[ITTLayer], list(self.layers))

    def head_weight(self) -> torch.Tensor | None:
        """The LM head's weight (vocab, d): the embedding's when tied; None when the head is
        a quantized module."""
        if self.head is not None:
            return None
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def output_logits(self, h: torch.Tensor, packed: bool = False) -> torch.Tensor:
        """``packed``: the head's matmul through packed_linear (compiled CPU steps)."""
        h = self.norm(h)
        w = self.head_weight()
        if w is None:
            assert self.head is not None
            return self.head(h).float()
        if packed:
            return packed_linear.linear(h, w).float()
        return (h @ w.t()).float()

    def forward(self, input_ids: torch.Tensor, routing: Routing | None = None,
                return_hidden: bool = False,
                logits_at: torch.Tensor | None = None) -> ModelOutput:
        """input_ids (B, T), all sequences starting at position 0.

        ``routing`` None means causal mode at the model's default budget for every sequence.
        ``logits_at`` (B, T) bool: compute the logits of those positions only, as (N, vocab)
        in row-major order (training on answer tokens skips the LM head everywhere else).
        """
        cfg = self.cfg
        B, T = input_ids.shape
        if T > cfg.max_position_embeddings:
            raise ValueError(f"sequence of {T} tokens exceeds max_position_embeddings "
                             f"({cfg.max_position_embeddings})")
        if routing is None and cfg.is_itt:
            routing = ThresholdRouting.for_budgets(cfg, [cfg.default_budget] * B,
                                                   input_ids.device)
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)                                  # (B, T, d)
        cos, sin = self.rotary(positions, x.dtype)
        routed = []
        itt_index = 0
        for layer in self.itt_layer_list:
            x = layer.base_update(x, layer.block.delta(x, cos, sin, mask=None))  # base step
            if layer.think_steps == 1:
                continue
            for t in range(1, layer.think_steps):
                stream = cfg.routed_stream_index(itt_index, t)
                logits = layer.router_logits(t, x)                        # (B, T)
                assert routing is not None                                # an ITT layer
                mask = routing.select(stream, logits)                     # (B, T) bool
                x = self._routed_step(layer, t, x, torch.sigmoid(logits), mask, positions)
                routed.append(mask)
            itt_index += 1
        h = x if logits_at is None else x[logits_at]
        out = ModelOutput(self.output_logits(h), torch.stack(routed, -1) if routed else None)
        if return_hidden:
            out.hidden = x
        return out

    def _routed_step(self, layer: ITTLayer, t: int, y: torch.Tensor, s: torch.Tensor,
                     mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Apply the block to the routed tokens only and add s·φ_t⊙Δ to them."""
        B, T, d = y.shape
        counts = mask.sum(1)                                              # (B,)
        K = int(counts.max())
        if K == 0:
            return y
        # Routed tokens first, in original order; the rest pad the gather up to K.
        ar = torch.arange(T, device=y.device).expand(B, T)
        order = torch.argsort(torch.where(mask, ar, ar + T), dim=1)[:, :K]   # (B, K)
        valid = torch.arange(K, device=y.device)[None, :] < counts[:, None]  # (B, K)
        x_r = y.gather(1, order[..., None].expand(B, K, d))               # (B, K, d)
        cos, sin = self.rotary(positions.gather(1, order), y.dtype)
        causal = torch.ones(K, K, dtype=torch.bool, device=y.device).tril()
        # Keys: routed tokens only. The diagonal keeps padding rows finite (they are dropped).
        attn_mask = (causal & valid[:, None, :]) | torch.eye(K, dtype=torch.bool,
                                                             device=y.device)
        delta = layer.block.delta(x_r, cos, sin, mask=attn_mask[:, None])  # (B, K, d)
        update = layer.routed_increment(t, s.gather(1, order) * valid, delta)  # (B, K, d)
        return y.scatter_add(1, order[..., None].expand(B, K, d), update)
