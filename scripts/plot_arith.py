"""Render the arith model card's pictures (docs/MODEL_CARD_ARITH.md).

    python scripts/plot_arith.py RESULTS.json [--model arith] [--out docs]

RESULTS.json is written by ``python -m itt_runtime.training.arith_eval --json``. Writes
  arith_accuracy_vs_compute.png  exact match against mean block applications per token: the
                                 ITT budget sweep as a line per setting, the controls as points;
  arith_thinking_depth.png       a few held-out answers, each character shaded by its thinking
                                 depth (routed steps taken) at the model's default budget.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from itt_runtime.model.itt import ThresholdRouting  # noqa: E402
from itt_runtime.model.loader import load_model  # noqa: E402
from itt_runtime.training import tasks  # noqa: E402

COLORS = {"add2": "tab:blue", "add3": "tab:red", "add4": "tab:purple", "mix": "tab:gray",
          "mul2": "tab:olive", "mul3": "tab:green"}
MARKERS = {"dense": "s", "loop": "^"}


def accuracy_vs_compute(results: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    settings = sorted({r["setting"] for r in results["itt"]})
    hardest = max((s for s in settings if s.startswith("add")), key=lambda s: int(s[3:]),
                  default=settings[0])
    for s in settings:
        rows = [r for r in results["itt"] if r["setting"] == s]
        c = COLORS.get(s)
        ax.plot([r["blocks_per_token"] for r in rows], [100 * r["accuracy"] for r in rows],
                "o-", color=c,
                label=f"ITT ×4 {s} (budget 0 … 1)" if s != "mix" else "ITT ×4 training mix")
        for r in rows if s == hardest else []:             # budget labels on one line
            ax.annotate(f"{r['budget']:g}", (r["blocks_per_token"], 100 * r["accuracy"]),
                        textcoords="offset points", xytext=(3, -10), fontsize=7, color=c)
        for name, marker in MARKERS.items():
            for r in results.get(name, []):
                if r["setting"] == s:
                    ax.plot(r["blocks_per_token"], 100 * r["accuracy"], marker, color=c,
                            markersize=8, markerfacecolor="none", markeredgewidth=1.5)
    for name, marker in MARKERS.items():
        if name in results:
            ax.plot([], [], marker, color="gray", markerfacecolor="none",
                    label={"dense": "dense control", "loop": "uniform-loop control"}[name])
    ax.set_xlabel("compute per token (mean block applications)")
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 100)
    ax.set_title("arith: accuracy vs compute (fresh held-out problems)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


@torch.no_grad()
def thinking_depth(model_path: str, out: Path, n: int = 8) -> None:
    model, tok = load_model(model_path)
    cfg = model.cfg
    budget = cfg.default_budget
    problems = tasks.take("eval", 1, "add", 3, n // 2) + tasks.take("eval", 1, "mul", 3, n // 2)
    fig, ax = plt.subplots(figsize=(6.4, 0.36 * n + 1.0), dpi=100)
    for row, p in enumerate(problems):
        ids = torch.tensor([tok.encode(p.text, add_bos=True)])
        route = ThresholdRouting.for_budgets(cfg, [budget])
        out_ = model(ids, routing=route)
        depth = out_.extra_steps[0, 1:].tolist()                # skip BOS
        pred = out_.logits[0].argmax(-1).tolist()
        n_prompt = len(p.prompt)
        for col, (ch, d) in enumerate(zip(p.text, depth)):
            shade = d / cfg.max_extra_steps
            ax.add_patch(plt.Rectangle((col, row), 1, 1, color=plt.cm.Oranges(shade)))
            # Answer characters in bold; one the model would get wrong (greedy, given the
            # correct prefix) in red. A token's depth is the computation that reads it and
            # predicts the next character.
            wrong = col >= n_prompt and tok.id_to_piece(pred[col]) != ch
            ax.text(col + 0.5, row + 0.5, ch, ha="center", va="center", fontsize=9,
                    fontweight="bold" if col >= n_prompt else "normal",
                    color="red" if wrong else "white" if shade > 0.6 else "black")
    width = max(len(p.text) for p in problems)
    ax.set_xlim(0, width)
    ax.set_ylim(len(problems), 0)
    ax.axis("off")
    sm = plt.cm.ScalarMappable(cmap="Oranges", norm=plt.Normalize(0, cfg.max_extra_steps))
    fig.colorbar(sm, ax=ax, fraction=0.04, pad=0.02, label="routed steps taken")
    ax.set_title(f"thinking depth per character at budget {budget:g} (answers in bold)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path)
    p.add_argument("--model", default="arith")
    p.add_argument("--out", type=Path, default=Path("docs"))
    a = p.parse_args(argv)
    results = json.loads(a.results.read_text())
    accuracy_vs_compute(results, a.out / "arith_accuracy_vs_compute.png")
    thinking_depth(a.model, a.out / "arith_thinking_depth.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
