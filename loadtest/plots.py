"""PNG plots of load test results (matplotlib, Agg backend: no display needed):

- latency.png: TTFT, ITL and E2E percentiles against the swept load (concurrency or rate);
- throughput.png: output tokens/s, requests/s (and goodput, when SLOs were given) and the
  mean think budget the server applied (elastic thinking) against the load;
- budget.png: thinking depth, median TTFT and ITL, and output tokens/s against the think budget
  (from budget sweeps, or from the per-budget breakdown of mixed runs).

Several results are overlaid (one line style per file) to compare runs.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

LOAD_LATENCIES = [("ttft_ms", "TTFT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E latency")]
STYLES = ["-", "--", ":", "-."]
STAT_STYLES = {"median": "-", "p90": "--", "p99": ":"}
MARKERS = ["o", "s", "^", "D"]


def load_axis(runs: list[dict]) -> tuple[str, str]:
    """('concurrency' | 'rate', axis label) of a result's sweep."""
    if all(r["rate"] is not None for r in runs):
        return "rate", "request rate (req/s)"
    return "concurrency", "concurrency"


def series_by_budget(res: dict) -> dict[str, list[dict]]:
    """A budget sweep's points grouped by budget, so that each budget is one line over the
    load; the points of a mixed run form a single group."""
    if not res["config"].get("budget_sweep"):
        return {"mix": res["runs"]}
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in res["runs"]:
        (budget,) = r["think_budgets"]
        groups[f"b={budget}"].append(r)
    return groups


def plot_load(results: dict[str, dict], out: Path) -> list[Path]:
    fig_lat, axes_lat = plt.subplots(1, 3, figsize=(15, 4.5))
    fig_thr, axes_thr = plt.subplots(1, 3, figsize=(16, 4.5))
    xlabel, colors = "load", iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10)
    # One colour per line group (file, budget), one line style per statistic, one marker per file.
    for i, (name, res) in enumerate(results.items()):
        marker = MARKERS[i % len(MARKERS)]
        axis, xlabel = load_axis(res["runs"])
        for group, runs in series_by_budget(res).items():
            runs = sorted(runs, key=lambda r: r[axis])
            xs, color = [r[axis] for r in runs], next(colors)
            tag = name if group == "mix" else f"{name} {group}"
            for ax, (key, title) in zip(axes_lat, LOAD_LATENCIES):
                for stat, style in STAT_STYLES.items():
                    ys = [r[key].get(stat) for r in runs]
                    if any(y is not None for y in ys):
                        ax.plot(xs, ys, style, color=color, marker=marker, label=f"{tag} {stat}")
                ax.set_title(title)
            for ax, key in zip(axes_thr, ("output_throughput", "request_throughput")):
                ax.plot(xs, [r[key] for r in runs], color=color, marker=marker, label=tag)
            if any(r.get("goodput") is not None for r in runs):
                axes_thr[1].plot(xs, [r.get("goodput") or 0.0 for r in runs], "--",
                                 color=color, marker=marker, label=f"{tag} goodput")
            applied = [r.get("mean_applied_think_budget") for r in runs]
            if any(a is not None for a in applied):
                axes_thr[2].plot(xs, applied, color=color, marker=marker, label=tag)
    for ax in axes_lat:
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms")
        ax.legend(fontsize="x-small")
        ax.grid(alpha=0.3)
    for ax, title in zip(axes_thr, ["output tokens/s", "requests/s (dashed: goodput)",
                                    "mean applied think budget"]):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    paths = [out / "latency.png", out / "throughput.png"]
    for fig, path in zip((fig_lat, fig_thr), paths):
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return paths


def budget_points(res: dict) -> dict[str, list[tuple[float, dict]]]:
    """Per load value: (think budget, per-budget metrics), from every point at that load."""
    axis, _ = load_axis(res["runs"])
    lines: dict[str, list[tuple[float, dict]]] = defaultdict(list)
    for r in res["runs"]:
        for b in r["per_budget"].values():
            if b["think_budget"] is not None and b["completed"]:
                lines[f"{axis}={r[axis]:g}"].append((b["think_budget"], b))
    return {k: sorted(v, key=lambda t: t[0]) for k, v in lines.items()}


def plot_budget(results: dict[str, dict], out: Path) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [("mean_normalized_depth", None, "mean normalized thinking depth"),
              ("ttft_ms", "median", "TTFT median (ms)"), ("itl_ms", "median", "ITL median (ms)"),
              ("output_throughput", None, "output tokens/s (share of the run)")]
    for i, (name, res) in enumerate(results.items()):
        for load, pts in budget_points(res).items():
            xs = [b for b, _ in pts]
            for ax, (key, stat, title) in zip(axes.flat, panels):
                ys = [m[key] if stat is None else m[key][stat] for _, m in pts]
                ax.plot(xs, ys, STYLES[i % len(STYLES)], marker="o", label=f"{name} {load}")
                ax.set_title(title)
    for ax in axes.flat:
        ax.set_xlabel("think budget")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.tight_layout()
    path = out / "budget.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render(results: dict[str, dict], out_dir: Path) -> list[Path]:
    """Writes the plots for ``results`` (name -> result JSON) into ``out_dir``; returns paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return plot_load(results, out_dir) + [plot_budget(results, out_dir)]
