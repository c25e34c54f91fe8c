"""Markdown table of held-out perplexity vs think budget for an ITT model and its dense control.

    python scripts/eval_table.py ITT_DIR DENSE_DIR [--text data/heldout.txt]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json

from itt_runtime.training.evaluate import main as itt_eval


def run(model: str, text: str, budgets: str) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        itt_eval(["--model", model, "--text", text, "--budgets", budgets, "--json"])
    return json.loads(buf.getvalue())


def budget_table(itt: dict, dense_ppl: float, name: str) -> list[str]:
    """Markdown rows (header first) of an ``itt-eval --json`` result against a dense
    perplexity: ppl, ratio, routed fraction (mean and range over (layer, step)), extra steps."""
    lines = [f"| think budget | {name} ppl | / dense | routed fraction (mean over steps) "
             "| min … max over (layer, step) | mean extra steps / token |",
             "|---|---|---|---|---|---|"]
    for r in itt["rows"]:
        f = r["routed_fraction"]
        lines.append(f"| {r['budget']:.2f} | {r['ppl']:.2f} | {r['ppl'] / dense_ppl:.3f} | "
                     f"{sum(f) / len(f):.3f} | {min(f):.3f} … {max(f):.3f} | "
                     f"{r['mean_extra_steps']:.2f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("itt")
    p.add_argument("dense")
    p.add_argument("--text", default="data/heldout.txt")
    p.add_argument("--budgets", default="0,0.25,0.5,0.6,0.75,1")
    a = p.parse_args()
    itt, dense = run(a.itt, a.text, a.budgets), run(a.dense, a.text, "0")
    dppl = dense["rows"][0]["ppl"]
    print(f"Held-out tokens: {itt['tokens']}. Dense control perplexity: **{dppl:.2f}**.\n")
    print("\n".join(budget_table(itt, dppl, "ITT")))
    pm = itt["paper_mode"]
    print(f"\nPaper (top-k, non-causal) mode at the training capacity {pm['capacity']}: "
          f"ppl {pm['ppl']:.2f} ({pm['ppl'] / dppl:.3f} of dense).")


if __name__ == "__main__":
    main()
