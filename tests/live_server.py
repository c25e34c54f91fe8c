"""Real processes for end-to-end tests: the server (``python -m server``) and Prometheus, each on
a free loopback port, started, waited for and stopped. Logs go to files (a full stdout pipe would
block the server) and are shown when start-up fails; /metrics is parsed with prometheus_client's
parser, never by grepping text.

Import as ``from live_server import …`` (tests/ is on sys.path through tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import yaml
from prometheus_client.parser import text_string_to_metric_families

from loadtest.servers import free_port, log_tail, stop_process, wait_ready  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "tiny-itt"


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
        return stop_process(self.proc)


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def launch(model_dir: Path | str, log_dir: Path, *flags: str, env: dict | None = None,
           served_name: str | None = MODEL_NAME, ready_timeout: float = 90,
           entry: tuple[str, ...] = ("-m", "server")) -> Server:
    """Start ``python -m server --model DIR --port P FLAGS…`` on 127.0.0.1 and wait for
    /health. Runs on the CPU with one thread and without compiled decode steps unless FLAGS
    or ENV say otherwise, so results do not depend on the machine (and no compile process
    takes the test machine's cores for minutes). ``entry`` replaces ``-m server`` (a script
    that wraps the server's ``main``)."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    cmd = [sys.executable, *entry, "--model", str(model_dir), "--port", str(port),
           *([] if "--host" in flags else ["--host", "127.0.0.1"]),
           *(["--served-model-name", served_name] if served_name else []),
           *([] if "--device" in flags else ["--device", "cpu"]),
           *([] if {"--compile", "--cpu-compile", "--enforce-eager"} & set(flags)
             else ["--compile", "off"]), *flags]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1",
                                     "PYTHONUNBUFFERED": "1", **(env or {})})
    server = Server(proc, port, log_path)
    wait_ready(f"{server.url}/health", proc, log_path, ready_timeout)
    return server


@contextmanager
def running_server(model_dir: Path | str, log_dir: Path, *flags: str,
                   ready_timeout: float = 180) -> Iterator[Server]:
    """``launch`` as a context manager: the server is stopped on exit."""
    server = launch(model_dir, log_dir, *flags, ready_timeout=ready_timeout)
    try:
        yield server
    finally:
        server.stop()


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
        stop_process(proc, 20)


def query(prom_url: str, expr: str) -> dict:
    """An instant query through Prometheus' HTTP API; returns the `data` object."""
    resp = httpx.get(prom_url + "/api/v1/query", params={"query": expr}, timeout=10)
    body = resp.json()
    if body.get("status") != "success":
        raise AssertionError(f"query failed: {expr}\n{body.get('error')}")
    return body["data"]
