"""Start-up with compiled CPU decode steps: a cold start (empty compile cache) and then a warm
start (the cache the cold start filled), one after the other, with ``--compile MODE`` (the
default, ``auto``, unless given).

    python scripts/bench_startup.py [--compile auto|on] [--model default] [--cache-dir DIR]

For each start it prints the seconds from launching the process to: ``/health`` answering 200
(with ``on``, after every variant is ready), the first completion (16 tokens) answered, and
each decode-step variant ready (``itt_compiled_step_ready_seconds``, counted from the
engine's start, plus the process's start-up before it); and the tokens/s of a 64-token
completion at one stream right after the first answer (``auto``: while the compile process
runs) and once all are ready. ``--cache-dir`` (default: a new temporary folder) is the compile
cache both starts use (``TORCHINDUCTOR_CACHE_DIR``), so the figures do not depend on what this
machine has cached.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadtest.servers import free_port, stop_process, wait_compiled, wait_ready  # noqa: E402

READY = re.compile(r"decode step \((.+?)\) ready ([\d.]+) s after start-up")

def complete(url: str, max_tokens: int) -> float:
    """Tokens/s of one greedy completion of ``max_tokens`` tokens."""
    start = time.perf_counter()
    r = httpx.post(f"{url}/v1/completions", timeout=600, json={
        "prompt": "And it came to pass", "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True})
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"] / (time.perf_counter() - start)


def one_start(model: str, mode: str, cache: Path, log: Path, timeout_s: float) -> dict:
    port = free_port()
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server", "--model", model,
                                 "--port", str(port), "--device", "cpu", "--compile", mode],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/health", proc, log, timeout_s)
        figures: dict = {"health_s": time.monotonic() - t0}
        complete(url, 16)
        figures["first_answer_s"] = time.monotonic() - t0
        figures["tok_s_first"] = complete(url, 64)
        states = wait_compiled(url, proc, log, timeout_s)
        figures["all_ready_s"] = time.monotonic() - t0
        figures["failed"] = [v for v, st in states.items() if st == "failed"]
        ready = [(m.group(1), float(m.group(2))) for m in READY.finditer(log.read_text())]
        figures["ready_s"] = dict(ready)
        figures["tok_s_compiled"] = complete(url, 64)
        return figures
    finally:
        stop_process(proc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compile", default="auto", choices=["auto", "on"])
    p.add_argument("--model", default="default")
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--timeout", type=float, default=900.0)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = a.cache_dir or Path(tmp) / "inductor"
        for name in ("cold", "warm"):
            f = one_start(a.model, a.compile, cache, Path(tmp) / f"{name}.log", a.timeout)
            ready = ", ".join(f"{v} {s:.1f} s" for v, s in f["ready_s"].items()) or "none"
            failed = f" (failed: {', '.join(f['failed'])})" if f["failed"] else ""
            print(f"--compile {a.compile}, {name} start: /health {f['health_s']:.1f} s, "
                  f"first answer {f['first_answer_s']:.1f} s, all ready {f['all_ready_s']:.1f}"
                  f" s{failed} (after the engine's start: {ready}); 1-stream tok/s "
                  f"{f['tok_s_first']:.0f} at first, {f['tok_s_compiled']:.0f} once all are "
                  f"ready", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
