"""Causal-mode routing calibration (ITT_SPEC "Routing rule").

For each budget b of a grid, one forward pass over held-out text fixes τ_{l,t}(b) step by
step, in model order: at routed step t of ITT layer l the threshold is the (1 − b) quantile of
that step's router logits (thresholds live in logit space, θ = logit(τ); see model/itt.py),
and the tokens above it are routed before the next step is scored. This is sequential because
later steps see the routing of earlier ones.
"""

from __future__ import annotations

import torch

from itt_runtime.config import RoutingCalibration
from itt_runtime.model.itt import ITTModel, Routing

DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))       # 0.05 … 0.95


class CalibratingRouting(Routing):
    def __init__(self, budget: float, valid: torch.Tensor | None = None) -> None:
        self.budget = budget
        self.valid = valid                  # (N, T) bool: tokens that count (padding does not)
        self.thresholds: dict[int, float] = {}

    def select(self, stream: int, logits: torch.Tensor) -> torch.Tensor:
        scores = logits.float() if self.valid is None else logits.float()[self.valid]
        theta = torch.quantile(scores.flatten(), 1.0 - self.budget).item()
        self.thresholds[stream] = theta
        return logits.float() > theta


@torch.no_grad()
def calibrate(model: ITTModel, windows: torch.Tensor,
              grid: tuple[float, ...] = DEFAULT_GRID,
              valid: torch.Tensor | None = None) -> RoutingCalibration:
    """windows (N, T) of held-out token ids; returns the thresholds for ``grid``.

    ``valid`` (N, T) bool marks the real tokens of right-padded sequences (one problem per
    row); only they set the quantiles. Padding sits after every real token, so under causal
    attention it cannot change how a real token is routed."""
    cfg = model.cfg
    model.eval()
    per_budget = []
    no_logits = torch.zeros_like(windows, dtype=torch.bool)   # only the routing is wanted
    for b in grid:
        routing = CalibratingRouting(b, valid)
        model(windows, routing=routing, logits_at=no_logits)
        per_budget.append(routing.thresholds)
    thresholds = tuple(
        tuple(tuple(per_budget[k][cfg.routed_stream_index(i, t)] for k in range(len(grid)))
              for t in range(1, cfg.think_steps))
        for i in range(len(cfg.itt_layers)))
    return RoutingCalibration(budgets=tuple(grid), thresholds=thresholds)
