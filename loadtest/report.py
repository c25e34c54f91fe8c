"""Renders load test results as tables: side by side per sweep point (`python -m loadtest report
A.json B.json`, with the change of the last file against the first), or one compact row per
point (`--summary`, the README's table). Plain text or Markdown."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LATENCIES = [("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2el_ms")]


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def rows_of(run: dict) -> list[tuple[str, object]]:
    """(metric name, value) for one sweep point, in display order."""
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(run["errors"].items())) or "none"
    rows = [("completed", run["completed"]), ("failed", run["failed"]), ("errors", errors),
            ("duration (s)", run["duration_s"]),
            ("request throughput (req/s)", run["request_throughput"]),
            ("output throughput (tok/s)", run["output_throughput"]),
            ("total token throughput (tok/s)", run["total_token_throughput"]),
            ("output tokens", run["total_output_tokens"]),
            ("prompt tokens sent", run["total_input_tokens"]),
            # Results written before prefix caching have no cached counts.
            ("prompt tokens cached", run.get("total_cached_tokens")),
            ("cached fraction of prompt", run.get("cached_fraction"))]
    for name, key in LATENCIES:
        for stat, value in run[key].items():
            if stat not in ("std", "p50"):          # p50 is the median
                rows.append((f"{name} {stat} (ms)", value))
    rows.append(("mean extra steps / token", run["mean_extra_steps"]))
    rows.append(("mean normalized depth", run["mean_normalized_depth"]))
    # Results written before elastic thinking have neither.
    rows.append(("mean applied think budget", run.get("mean_applied_think_budget")))
    rows.append(("goodput (req/s within SLOs)", run.get("goodput")))
    for key, b in run["per_budget"].items():
        rows += [(f"[budget {key}] requests", b["completed"]),
                 (f"[budget {key}] mean normalized depth", b["mean_normalized_depth"]),
                 (f"[budget {key}] TTFT median (ms)", b["ttft_ms"]["median"]),
                 (f"[budget {key}] ITL median (ms)", b["itl_ms"]["median"]),
                 (f"[budget {key}] output tok/s", b["output_throughput"])]
    return rows


def table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def change(first, last) -> str:
    if not isinstance(first, (int, float)) or not isinstance(last, (int, float)) or not first:
        return ""
    return f"{(last - first) / abs(first) * 100:+.1f}%"


def render_table(results: dict[str, dict], markdown: bool = False) -> str:
    """Side by side: for each sweep point label, one column per result file."""
    names = list(results)
    labels = list(dict.fromkeys(r["label"] for res in results.values() for r in res["runs"]))
    blocks = []
    for label in labels:
        per_file = [next((r for r in res["runs"] if r["label"] == label), None)
                    for res in results.values()]
        columns = [dict(rows_of(run)) if run else {} for run in per_file]
        metrics = list(dict.fromkeys(m for col in columns for m in col))
        header = ["metric"] + names + (["change"] if len(names) > 1 else [])
        rows = []
        for m in metrics:
            values = [col.get(m) for col in columns]
            row = [m] + [fmt(v) for v in values]
            if len(names) > 1:
                row.append(change(values[0], values[-1]))
            rows.append(row)
        title = f"## {label}" if markdown else f"== {label} =="
        blocks.append(title + "\n\n" + table(header, rows, markdown))
    return "\n\n".join(blocks)


def render_summary(results: dict[str, dict], markdown: bool = False) -> str:
    """One row per (file, sweep point): throughput and p50/p99 of TTFT and ITL."""
    header = ["run", "point", "req/s", "output tok/s", "TTFT p50 (ms)", "TTFT p99 (ms)",
              "ITL p50 (ms)", "ITL p99 (ms)", "norm. depth", "failed"]
    rows = []
    for name, res in results.items():
        for r in res["runs"]:
            rows.append([name, r["label"], fmt(r["request_throughput"]),
                         fmt(r["output_throughput"]), fmt(r["ttft_ms"]["median"]),
                         fmt(r["ttft_ms"].get("p99")), fmt(r["itl_ms"]["median"]),
                         fmt(r["itl_ms"].get("p99")), fmt(r["mean_normalized_depth"]),
                         fmt(r["failed"])])
    return table(header, rows, markdown)


def load(paths: list[Path]) -> dict[str, dict]:
    """name -> result; names are the file stems, made unique with their parent folder."""
    stems = [p.stem for p in paths]
    return {(p.stem if stems.count(p.stem) == 1 else f"{p.parent.name}/{p.stem}"):
            json.loads(p.read_text()) for p in paths}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest report",
                                description="Compare load test results side by side.")
    p.add_argument("results", type=Path, nargs="+", help="JSON files from python -m loadtest")
    p.add_argument("--markdown", action="store_true", help="Markdown tables")
    p.add_argument("--summary", action="store_true", help="one row per sweep point")
    p.add_argument("--plots", type=Path, help="also render comparison plots into this folder")
    args = p.parse_args(argv)
    results = load(args.results)
    render = render_summary if args.summary else render_table
    print(render(results, args.markdown))
    if args.plots:
        from loadtest.plots import render as render_plots
        for path in render_plots(results, args.plots):
            print(f"wrote {path}")
    return 0
