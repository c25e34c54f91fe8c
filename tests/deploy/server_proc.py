"""Real processes for end-to-end tests: itt-server and Prometheus, each on a free loopback port,
started, waited for, and stopped. Logs go to files (a full stdout pipe would block the server)
and their tail is shown when start-up fails."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
SERVER_CMD = [sys.executable, "-m", "server"]
SERVED_MODEL_NAME = "itt-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, n: int = 40) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(lines[-n:])


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Polls ``url`` until it answers 200; fails with the log tail if the process dies first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{log_tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready after {timeout_s} s:\n{log_tail(log)}")


def stop(proc: subprocess.Popen, timeout_s: float = 40) -> None:
    """SIGTERM (the server drains, at most 30 s by default), then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def running_server(model_dir: Path, work_dir: Path, extra_args: tuple[str, ...] = (),
                   timeout_s: float = 180) -> Iterator[str]:
    """Runs ``python -m server --model model_dir`` on a free port; yields its base URL."""
    port = free_port()
    cmd = SERVER_CMD + ["--model", str(model_dir), "--served-model-name", SERVED_MODEL_NAME,
                        "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                        *extra_args]
    # One thread: the machine is shared with training jobs, and the test models are tiny.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = work_dir / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url + "/health", proc, log, timeout_s)
            yield url
        finally:
            stop(proc)


@contextmanager
def running_prometheus(target: str, work_dir: Path, scrape_interval_s: int = 1,
                       rule_files: tuple[Path, ...] = ()) -> Iterator[str]:
    """Runs Prometheus scraping ``target`` (host:port) as job "itt-server"; yields its URL."""
    port = free_port()
    config = {
        "global": {"scrape_interval": f"{scrape_interval_s}s",
                   "scrape_timeout": f"{scrape_interval_s}s",
                   "evaluation_interval": f"{scrape_interval_s}s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": "itt-server",
                            "static_configs": [{"targets": [target]}]}],
    }
    (work_dir / "prometheus.yml").write_text(yaml.safe_dump(config))
    cmd = ["prometheus", f"--config.file={work_dir / 'prometheus.yml'}",
           f"--storage.tsdb.path={work_dir / 'tsdb'}",
           f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    log = work_dir / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=work_dir, stdout=out, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url + "/-/ready", proc, log, 60)
            yield url
        finally:
            stop(proc, 20)


def query(prom_url: str, expr: str) -> dict:
    """An instant query through Prometheus' HTTP API; returns the `data` object."""
    resp = httpx.get(prom_url + "/api/v1/query", params={"query": expr}, timeout=10)
    body = resp.json()
    if body.get("status") != "success":
        raise AssertionError(f"query failed: {expr}\n{body.get('error')}")
    return body["data"]
