"""SIGTERM: the server stops accepting connections, lets in-flight requests finish (plain and
streamed), and exits 0; with --drain-timeout, requests that outlast it are cut off and the
process still exits 0 promptly."""

from __future__ import annotations

import signal
import threading
import time

import httpx
from live_server import MODEL_NAME, launch, metric

LONG = {"model": MODEL_NAME, "prompt": "In the beginning", "max_tokens": 480, "n": 4,
        "temperature": 1.0, "seed": 7, "ignore_eos": True}


def wait_running(server, count: int) -> None:
    deadline = time.time() + 20
    while metric(server.metrics(), "itt_num_requests_running") < count:
        assert time.time() < deadline, "requests never started"
        time.sleep(0.02)


def refuses_connections(server, timeout: float = 5.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            httpx.get(f"{server.url}/health", timeout=1)
        except httpx.ConnectError:
            return True
        time.sleep(0.05)
    return False


def test_sigterm_finishes_in_flight_requests_then_exits_0(tiny_model_dir, tmp_path):
    server = launch(tiny_model_dir, tmp_path)
    results: dict = {}

    def plain():
        results["plain"] = httpx.post(f"{server.url}/v1/completions", json=LONG, timeout=120)

    def streamed():
        chunks = server.client(timeout=120).completions.create(
            stream=True, **{k: v for k, v in LONG.items() if k not in ("ignore_eos",)},
            extra_body={"ignore_eos": True})
        results["streamed"] = [c.choices[0].finish_reason for c in chunks if c.choices]

    threads = [threading.Thread(target=plain), threading.Thread(target=streamed)]
    for t in threads:
        t.start()
    try:
        wait_running(server, 8)
        server.proc.send_signal(signal.SIGTERM)
        assert refuses_connections(server)
        assert any(t.is_alive() for t in threads), "requests ended before the drain began"
        for t in threads:
            t.join(120)
        plain_resp = results["plain"]
        assert plain_resp.status_code == 200
        body = plain_resp.json()
        assert [c["finish_reason"] for c in body["choices"]] == ["length"] * 4
        assert body["usage"]["completion_tokens"] == 4 * 480
        assert results["streamed"].count("length") == 4
        assert server.proc.wait(60) == 0
        assert "draining" in server.log()
    finally:
        server.stop()


def test_drain_timeout_bounds_the_wait(tiny_model_dir, tmp_path):
    server = launch(tiny_model_dir, tmp_path, "--drain-timeout", "0.5")
    outcome: dict = {}

    def plain():
        try:
            outcome["resp"] = httpx.post(f"{server.url}/v1/completions", json=LONG,
                                         timeout=120)
        except httpx.HTTPError as e:
            outcome["error"] = e

    t = threading.Thread(target=plain)
    t.start()
    try:
        wait_running(server, 4)
        start = time.time()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        assert time.time() - start < 10
        t.join(30)
        assert "error" in outcome or outcome["resp"].status_code != 200
    finally:
        server.stop()

