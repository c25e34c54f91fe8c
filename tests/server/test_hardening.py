"""Hostile and careless requests against the real server: every one gets a clean 4xx naming
what is wrong, nothing reaches the engine half-validated, one request's fault fails that
request alone, an engine that cannot run exits the process non-zero, admission is exact
under a burst, and idle or slow connections are closed."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from live_server import MODEL_NAME, REPO, launch

POSTS = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]
FAULTY = (str(REPO / "tests" / "server" / "faulty_server.py"),)
GREEDY = {"model": MODEL_NAME, "prompt": "In the beginning", "max_tokens": 6,
          "temperature": 0, "ignore_eos": True}


def post_raw(server, path: str, body: bytes | str) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", content=body, timeout=60,
                      headers={"Content-Type": "application/json"})


def assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def assert_healthy(server, expected_text: str) -> None:
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    resp = httpx.post(f"{server.url}/v1/completions", json=GREEDY, timeout=60)
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == expected_text


@pytest.fixture(scope="module")
def baseline(tiny_server) -> str:
    resp = httpx.post(f"{tiny_server.url}/v1/completions", json=GREEDY, timeout=60)
    assert resp.status_code == 200
    return resp.json()["choices"][0]["text"]


@pytest.mark.parametrize("extra, param", [
    ({"max_tokens": 4, "min_tokens": 2, "stop_token_ids": [8192]}, "stop_token_ids"),
    ({"max_tokens": 4, "min_tokens": 2, "stop_token_ids": [2**70]}, "stop_token_ids"),
    ({"n": 2, "temperature": 1, "seed": 2**64}, "seed"),
    ({"seed": -2**63 - 1}, "seed"),
    ({"max_tokens": 2**70}, "max_tokens"),
    ({"top_k": 2**63}, "top_k"),
    ({"logprobs": 2**64}, "logprobs"),
    ({"n": 10**30}, "n"),
    ({"prompt": [1, 2, 2**70]}, "prompt"),
    ({"prompt": "x" * 300_000}, "prompt"),
])
def test_out_of_range_values_are_400_and_the_engine_lives(tiny_server, baseline, extra, param):
    body = {**GREEDY, **extra}
    assert_error(post_raw(tiny_server, "/v1/completions", json.dumps(body)), 400, param)
    stream = post_raw(tiny_server, "/v1/completions", json.dumps({**body, "stream": True}))
    assert_error(stream, 400, param)
    assert_healthy(tiny_server, baseline)


def test_largest_seed_with_n_2_is_served(tiny_server, baseline):
    body = {**GREEDY, "n": 2, "temperature": 1, "seed": 2**64 - 1}
    resp = post_raw(tiny_server, "/v1/completions", json.dumps(body))
    assert resp.status_code == 200 and len(resp.json()["choices"]) == 2
    assert_healthy(tiny_server, baseline)


@pytest.mark.parametrize("path", POSTS)
def test_deep_json_is_400_on_every_post_endpoint(tiny_server, path):
    for depth in (40, 10_000, 200_000):
        error = assert_error(post_raw(tiny_server, path, "[" * depth + "]" * depth), 400)
        assert "nested deeper" in error["message"]
    nested = '{"prompt": "x", "logit_bias": ' + '{"a": ' * 50 + "1" + "}" * 50 + "}"
    assert "nested deeper" in assert_error(post_raw(tiny_server, path, nested), 400)["message"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", '{"model": "tiny-itt", "prompt": "a\\ud800b"}', "prompt"),
    ("/v1/completions", '{"model": "tiny-itt", "prompt": ["ok", "\\udfff"]}', "prompt"),
    ("/v1/completions", '{"model": "tiny-itt", "prompt": "a", "stop": "\\ud800"}', "stop"),
    ("/v1/chat/completions",
     '{"model": "tiny-itt", "messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", '{"model": "tiny-itt", "prompt": "a", "\\ud800": 1}', "\\ud800"),
])
def test_lone_surrogates_are_400_naming_the_field(tiny_server, baseline, path, body, param):
    error = assert_error(post_raw(tiny_server, path, body), 400)
    assert error["param"] == param and "Unicode" in error["message"]
    assert_healthy(tiny_server, baseline)


def test_one_failing_request_fails_alone(tiny_model_dir, tmp_path):
    server = launch(tiny_model_dir, tmp_path, entry=(*FAULTY, "one"))
    try:
        expected = httpx.post(f"{server.url}/v1/completions", json=GREEDY, timeout=60).json()
        results: dict = {}

        def good(i):
            results[i] = httpx.post(f"{server.url}/v1/completions", timeout=60,
                                    json={**GREEDY, "max_tokens": 40}).json()
        threads = [threading.Thread(target=good, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        bad = httpx.post(f"{server.url}/v1/completions", json={**GREEDY, "max_tokens": 13},
                         timeout=60)
        error = assert_error(bad, 500)
        assert error["type"] == "server_error" and error["code"] == "internal_error"
        assert "secret" not in bad.text and "RuntimeError" not in bad.text
        request_id = error["message"].split("request ")[1].split(";")[0]
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                          json={**GREEDY, "max_tokens": 13, "stream": True}) as resp:
            lines = [line for line in resp.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        chunk = json.loads(lines[-2].removeprefix("data: "))
        assert chunk["error"]["code"] == "internal_error" and "secret" not in lines[-2]
        for t in threads:
            t.join(60)
        for i in range(3):
            assert results[i]["choices"][0]["text"].startswith(
                expected["choices"][0]["text"])
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        log = server.log()
        assert request_id in log and "injected sampler fault" in log
    finally:
        assert server.stop() == 0


def test_engine_that_cannot_run_exits_the_process_non_zero(tiny_model_dir, tmp_path):
    server = launch(tiny_model_dir, tmp_path, entry=(*FAULTY, "every"))
    try:
        resp = httpx.post(f"{server.url}/v1/completions", json=GREEDY, timeout=60)
        assert resp.status_code in (500, 503) and "injected" not in resp.text
        assert server.proc.wait(30) == 1
        assert "engine died" in server.log()
    finally:
        server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_admission_is_exact_under_a_burst(tiny_model_dir, tmp_path, stream):
    """max_num_seqs 2 + max_queue_len 3: exactly 5 of 40 simultaneous requests get in."""
    server = launch(tiny_model_dir, tmp_path, "--max-num-seqs", "2", "--max-queue-len", "3")
    statuses: list = []
    barrier = threading.Barrier(40)
    body = {**GREEDY, "max_tokens": 200, "stream": stream}

    def one():
        with httpx.Client(timeout=120) as c:
            barrier.wait()
            resp = c.post(f"{server.url}/v1/completions", json=body)
            statuses.append((resp.status_code, resp.headers.get("retry-after")))
    threads = [threading.Thread(target=one) for _ in range(40)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert sorted(s for s, _ in statuses).count(200) == 5
        assert [r for s, r in statuses if s == 429] == ["1"] * 35
    finally:
        server.stop()


def recv_closed(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` within ``within`` seconds (reads until EOF)."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_idle_slow_and_surplus_connections_are_closed(tiny_model_dir, tmp_path, http):
    server = launch(tiny_model_dir, tmp_path, "--timeout-request-header", "1",
                    "--timeout-keep-alive", "1", "--max-connections", "8", "--http", http)
    addr = ("127.0.0.1", server.port)
    try:
        start = time.time()
        idle = socket.create_connection(addr)                 # never sends a byte
        assert recv_closed(idle, 5) and time.time() - start < 4

        slow = socket.create_connection(addr)                 # slowloris
        start = time.time()
        closed = False
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100:
            try:
                slow.send(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.1)
        assert closed or recv_closed(slow, 2)
        assert time.time() - start < 5

        # Headers in time, then a body that takes longer than the header deadline: the
        # deadline covers headers only, so the request is served.
        late_body = socket.create_connection(addr)
        body = json.dumps({"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1}).encode()
        late_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                          b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        time.sleep(1.5)
        late_body.sendall(body)
        late_body.settimeout(10)
        assert b"200 OK" in late_body.recv(65536)

        kept = socket.create_connection(addr)                 # keep-alive, then idle
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in kept.recv(4096)
        start = time.time()
        assert recv_closed(kept, 5) and time.time() - start < 4

        held = [socket.create_connection(addr) for _ in range(8)]
        surplus = socket.create_connection(addr)
        surplus.settimeout(5)
        assert surplus.recv(4096).startswith(b"HTTP/1.1 503")
        for s in held + [surplus, idle, slow, late_body, kept]:
            s.close()
        time.sleep(0.5)
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    finally:
        server.stop()


def test_tokenizer_routes_need_the_api_key(tiny_model_dir, tmp_path):
    server = launch(tiny_model_dir, tmp_path, "--api-key", "k3y")
    try:
        for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [5]})):
            assert_error(httpx.post(f"{server.url}{path}", json=body, timeout=10), 401)
            ok = httpx.post(f"{server.url}{path}", json=body, timeout=10,
                            headers={"Authorization": "Bearer k3y"})
            assert ok.status_code == 200
        assert httpx.get(f"{server.url}/tokenizer_info", timeout=10).status_code == 200
    finally:
        server.stop()


def test_config_claiming_a_huge_model_fails_fast_with_small_memory(tiny_model_dir, tmp_path):
    """A 100B-parameter claim over a tiny weights file: one line, exit 1, < 1 s of loading,
    and peak memory no more than a bare interpreter that imports the server."""
    model = tmp_path / "huge"
    model.mkdir()
    for f in ("model.safetensors", "tokenizer.model"):
        (model / f).write_bytes((tiny_model_dir / f).read_bytes())
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg.update(d_model=12288, n_layers=96, n_heads=96, n_kv_heads=8, ffn_dim=28672)
    (model / "config.json").write_text(json.dumps(cfg))
    probe = ("import resource, sys, time; from server import cli; t = time.time(); "
             "rc = cli.main(sys.argv[1:]) if len(sys.argv) > 1 else 0; "
             "print('RESULT', rc, time.time() - t, "
             "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")

    def run(*args):
        out = subprocess.run([sys.executable, "-c", probe, *args], cwd=REPO, timeout=120,
                             capture_output=True, text=True)
        line = [x for x in out.stderr.splitlines() if x.startswith("RESULT")][0].split()
        return out, int(line[1]), float(line[2]), int(line[3])

    _, _, _, bare_kib = run()
    out, rc, seconds, peak_kib = run("--model", str(model), "--port", "0", "--device", "cpu")
    errors = [x for x in out.stderr.splitlines() if not x.startswith("RESULT")]
    assert rc == 1 and len(errors) == 1 and "implies at least" in errors[0], out.stderr
    assert seconds < 1.0
    assert peak_kib - bare_kib < 64 * 1024, (bare_kib, peak_kib)
