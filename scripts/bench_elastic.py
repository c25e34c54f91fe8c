"""Elastic thinking under load: the same open-loop (Poisson) workload against two servers on
the default model, elastic thinking off and on, rate by rate, interleaved.

    python scripts/bench_elastic.py --rates 1,2,3,4,6 --duration 40 --out bench_elastic.json

Every request asks for think_budget 1 with min_think_budget 0 (the off server ignores the
floor: it runs every request at 1). Per rate it prints p50/p99 TTFT and ITL, goodput
(requests meeting both targets per second) and the mean applied budget, for both servers,
and writes the loadtest results (one JSON per server) so that `python -m loadtest report`
and the loadtest plots can render them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from loadtest.run import LoadConfig, run
from loadtest.servers import free_port, stop_process, wait_compiled, wait_ready


def start(flags: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "server", "--device", "cpu", "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get(
                                "OMP_NUM_THREADS", "1")})
    url = f"http://127.0.0.1:{port}"
    wait_ready(f"{url}/health", proc, log, timeout_s=900)
    wait_compiled(url, proc, log, timeout_s=900)      # measured at its compiled speed
    return proc, url


def warm_up(url: str) -> None:
    """Requests that run every kind of step (one row or several, routable or at budget 0)
    once before the measured rates (the compiled steps are ready by then: ``start`` waits
    for them)."""
    model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]

    def generate(budget: float) -> None:
        r = httpx.post(f"{url}/v1/completions", timeout=900, json={
            "model": model, "prompt": "warm up", "max_tokens": 8, "ignore_eos": True,
            "think_budget": budget})
        r.raise_for_status()

    for budget in (1.0, 0.0):
        generate(budget)                                   # one row
        with ThreadPoolExecutor(4) as pool:                # several rows
            list(pool.map(generate, [budget] * 4))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="1,2,3,4,6")
    p.add_argument("--duration", type=float, default=40.0, help="seconds per rate")
    p.add_argument("--prompt-len", default="48")
    p.add_argument("--output-len", default="32")
    p.add_argument("--target-itl-ms", type=float, default=60.0)
    p.add_argument("--target-ttft-ms", type=float, default=1500.0)
    p.add_argument("--out", type=Path, default=Path("bench_elastic.json"))
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="one more itt-server argument for both servers (repeatable), e.g. "
                        "--server-arg=--compile=off")
    a = p.parse_args()
    rates = [float(x) for x in a.rates.split(",")]
    logs = a.out.with_suffix("")
    logs.mkdir(parents=True, exist_ok=True)
    servers = {
        "fixed": start(a.server_arg, logs / "fixed.log"),
        "elastic": start([*a.server_arg, "--elastic-thinking", "--target-itl-ms",
                          str(a.target_itl_ms), "--target-ttft-ms", str(a.target_ttft_ms)],
                         logs / "elastic.log"),
    }
    results: dict[str, dict] = {name: {"runs": []} for name in servers}
    try:
        for _, url in servers.values():
            warm_up(url)
        for i, rate in enumerate(rates):
            for name, (_, url) in servers.items():       # interleaved: same rate, both
                cfg = LoadConfig(base_url=url, rate=(rate,), num_requests=None,
                                 duration_s=a.duration, warmup=2, prompt_len=a.prompt_len,
                                 output_len=a.output_len, think_budgets="1",
                                 min_think_budget=0.0, slo_ttft_ms=a.target_ttft_ms,
                                 slo_itl_ms=a.target_itl_ms, ignore_eos=True, seed=i,
                                 progress=False)
                res = run(cfg)
                results[name].update({k: v for k, v in res.items() if k != "runs"})
                results[name]["runs"] += res["runs"]
                r = res["runs"][0]
                print(f"rate {rate:5.2f}  {name:8s}  TTFT p50/p99 {r['ttft_ms']['median']:7.0f}"
                      f"/{r['ttft_ms']['p99']:7.0f} ms  ITL p50/p99 "
                      f"{r['itl_ms']['median']:6.1f}/{r['itl_ms']['p99']:6.1f} ms  goodput "
                      f"{r['goodput']:5.2f} req/s  applied budget "
                      f"{r['mean_applied_think_budget'] or 0:.2f}", flush=True)
    finally:
        for proc, _ in servers.values():
            stop_process(proc)
    for name, res in results.items():
        path = a.out.with_name(f"{a.out.stem}-{name}.json")
        path.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
