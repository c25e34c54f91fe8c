"""Server processes for whoever starts its own: the benchmarks (``loadtest.peer_bench``,
``scripts/bench_prefix_cache.py``, ``scripts/bench_elastic.py``) and the end-to-end tests
(tests/live_server.py). A free loopback port, a wait until the process answers, and a stop."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

STOP_TIMEOUT_S = 40          # SIGTERM drains for at most 30 s by default, then SIGKILL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, n: int = 40) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(lines[-n:])


def stop_process(proc: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM, then SIGKILL after ``timeout_s``. Returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Polls ``url`` until it answers 200; fails with the log tail if the process dies first
    or the time runs out (the process is then stopped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{str(proc.args)[:120]} exited with {proc.returncode}:\n"
                               f"{log_tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_process(proc)
    raise RuntimeError(f"{url} not ready after {timeout_s} s:\n{log_tail(log)}")


def compiled_steps(base_url: str) -> dict[str, str]:
    """An itt-server's compiled decode-step variants and their state ("compiling", "ready",
    "failed"), from ``itt_compiled_step_state`` on /metrics; empty when it compiles none."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    states: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "itt_compiled_step_state":
            for sample in family.samples:
                if sample.value == 1:
                    states[sample.labels["variant"]] = sample.labels["state"]
    return states


def wait_compiled(base_url: str, proc: subprocess.Popen, log: Path,
                  timeout_s: float) -> dict[str, str]:
    """Waits until no compiled decode step of an itt-server is still compiling (the default
    ``--compile auto`` answers at once but reaches its speed later). Returns the states."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{str(proc.args)[:120]} exited with {proc.returncode}:\n"
                               f"{log_tail(log)}")
        states = compiled_steps(base_url)
        if "compiling" not in states.values():
            return states
        if time.monotonic() > deadline:
            raise RuntimeError(f"{base_url}: decode steps still compiling after {timeout_s} s: "
                               f"{states}")
        time.sleep(1.0)
