"""itt-eval: perplexity, routed fraction and thinking depth vs think budget on a text file.

    itt-eval --model DIR|default --text FILE --budgets 0,0.25,0.5,0.75,1 [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F

from itt_runtime.config import ConfigError
from itt_runtime.model.itt import ITTModel, ThresholdRouting, TopKRouting
from itt_runtime.model.loader import load_model
from itt_runtime.training.data import encode_documents, eval_windows


def text_windows(tok, text: str, seq_len: int) -> torch.Tensor:
    """One document per line -> BOS doc EOS … stream -> (N, seq_len + 1) windows."""
    ids = encode_documents(tok, text)
    if (len(ids) - 1) // seq_len == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return eval_windows(torch.tensor(ids), seq_len)


@torch.no_grad()
def evaluate_budget(model: ITTModel, windows: torch.Tensor, budget: float | None,
                    batch_size: int = 16, capacity: float | None = None) -> dict:
    """Causal mode at ``budget``, or paper (top-k) mode when ``capacity`` is given."""
    cfg = model.cfg
    nll, count, routed_sum = 0.0, 0, torch.zeros(cfg.max_extra_steps, dtype=torch.float64)
    for i in range(0, len(windows), batch_size):
        chunk = windows[i: i + batch_size]
        if not cfg.is_itt:
            routing = None
        elif capacity is not None:
            routing = TopKRouting(capacity)
        else:
            b = cfg.default_budget if budget is None else budget
            routing = ThresholdRouting.for_budgets(cfg, [b] * len(chunk))
        out = model(chunk[:, :-1], routing=routing)
        nll += F.cross_entropy(out.logits.flatten(0, 1), chunk[:, 1:].flatten(),
                               reduction="sum").item()
        count += chunk[:, 1:].numel()
        if out.routed is not None:
            routed_sum += out.routed.flatten(0, 1).double().sum(0)
    fractions = (routed_sum / count).tolist()
    return {"budget": budget, "ppl": math.exp(nll / count),
            "routed_fraction": [round(f, 4) for f in fractions],
            "mean_extra_steps": float(sum(fractions))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="itt-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default",
                   help="model directory, GGUF file, or 'default'")
    p.add_argument("--text", required=True, help="plain text file, one document per line")
    p.add_argument("--budgets", default="0,0.25,0.5,0.75,1")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    try:
        budgets = [float(b) for b in a.budgets.split(",")]
    except ValueError:
        p.error(f"--budgets must be comma-separated numbers, got {a.budgets!r}")
    if any(not 0.0 <= b <= 1.0 for b in budgets):
        p.error("--budgets must lie in [0, 1]")
    try:
        model, tok = load_model(a.model)
        with open(a.text, encoding="utf-8") as f:
            windows = text_windows(tok, f.read(), a.seq_len)
    except (ConfigError, OSError, ValueError) as e:
        print(f"itt-eval: error: {e}", file=sys.stderr)
        return 2
    rows = [evaluate_budget(model, windows, b) for b in budgets]
    cfg = model.cfg
    paper = (evaluate_budget(model, windows, None, capacity=cfg.train_capacity)
             if cfg.is_itt else None)
    if a.json:
        print(json.dumps({"model": str(a.model), "tokens": windows[:, 1:].numel(),
                          "rows": rows,
                          "paper_mode": paper and {"capacity": cfg.train_capacity,
                                                   "ppl": paper["ppl"]}}))
        return 0
    print(f"{windows[:, 1:].numel()} tokens, {len(cfg.itt_layers)} ITT layers x{cfg.think_steps}")
    print(f"{'budget':>7} {'ppl':>9} {'extra steps':>12}  routed fraction per (layer, step)")
    for r in rows:
        frac = " ".join(f"{f:.3f}" for f in r["routed_fraction"])
        print(f"{r['budget']:>7.2f} {r['ppl']:>9.3f} {r['mean_extra_steps']:>12.3f}  {frac}")
    if paper:
        print(f"paper mode (top-k at capacity {cfg.train_capacity}): ppl {paper['ppl']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
