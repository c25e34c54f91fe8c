"""SIGTERM: /health turns 503 at once and new requests get 503, in-flight requests (plain and
streamed) finish, and the server exits 0; with --drain-timeout, requests that outlast it end
cleanly (a stream with a server_shutdown error chunk and [DONE], a plain request with a 503
body), with no traceback in the log, and the process still exits 0 promptly."""

from __future__ import annotations

import json
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


def assert_draining(server) -> None:
    """/health is 503 "draining" and a new request is refused with server_shutdown."""
    deadline = time.time() + 5
    while (health := httpx.get(f"{server.url}/health", timeout=5)).status_code == 200:
        assert time.time() < deadline, "/health never turned 503"
        time.sleep(0.02)
    assert health.status_code == 503 and health.json() == {"status": "draining"}
    refused = httpx.post(f"{server.url}/v1/completions", timeout=5,
                         json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 2})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "server_shutdown"


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
        assert_draining(server)
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


def test_requests_outlasting_the_drain_timeout_end_cleanly(tiny_model_dir, tmp_path):
    server = launch(tiny_model_dir, tmp_path, "--drain-timeout", "1")
    outcome: dict = {}

    def plain():
        outcome["plain"] = httpx.post(f"{server.url}/v1/completions", json=LONG, timeout=120)

    def streamed():
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=120,
                          json={**LONG, "stream": True}) as resp:
            outcome["lines"] = [line for line in resp.iter_lines() if line]

    threads = [threading.Thread(target=plain), threading.Thread(target=streamed)]
    for t in threads:
        t.start()
    try:
        wait_running(server, 8)
        start = time.time()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        assert time.time() - start < 10
        for t in threads:
            t.join(30)
        resp = outcome["plain"]
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "server_shutdown"
        lines = outcome["lines"]
        assert lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2].removeprefix("data: "))
        assert last["error"]["code"] == "server_shutdown", lines[-2]
        assert len(lines) > 3               # it did stream tokens before the deadline
        assert "Traceback" not in server.log()
    finally:
        server.stop()
