"""The real server (``python -m server``) as a subprocess on a free port, for end-to-end
tests; /metrics parsed with prometheus_client's parser (never by grepping text)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "tiny-itt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw) -> openai.OpenAI:
        kw.setdefault("api_key", "unused")
        kw.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=f"{self.url}/v1", **kw)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict:
        """{(sample name, frozenset of labels except model_name): value}."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = {k: v for k, v in s.labels.items() if k != "model_name"}
                out[(s.name, frozenset(labels.items()))] = s.value
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def launch(model_dir: Path | str, log_dir: Path, *flags: str, env: dict | None = None,
           served_name: str | None = MODEL_NAME, ready_timeout: float = 90,
           entry: tuple[str, ...] = ("-m", "server")) -> Server:
    """Start ``python -m server --model DIR --port P FLAGS…`` and wait for /health. Runs on
    the CPU unless FLAGS say otherwise, so results do not depend on the machine. ``entry``
    replaces ``-m server`` (a script that wraps the server's ``main``)."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    cmd = [sys.executable, *entry, "--model", str(model_dir), "--port", str(port),
           *(["--served-model-name", served_name] if served_name else []),
           *([] if "--device" in flags else ["--device", "cpu"]), *flags]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    server = Server(proc, port, log_path)
    deadline = time.time() + ready_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not ready after {ready_timeout} s:\n{server.log()}")
