"""Property-based fuzzing against the real server: every hostile hand-written request plus
requests generated from the server's published OpenAPI schema (schemathesis); none may get a
5xx, and the server stays healthy and deterministic. The full 2,000-request run is
``python -m loadtest.fuzz``; CI runs a bounded sample."""

from __future__ import annotations

import httpx
from live_server import MODEL_NAME, launch

from loadtest.fuzz import Fuzzer, hostile_cases


def test_openapi_publishes_request_bodies_and_errors(tiny_server):
    doc = httpx.get(f"{tiny_server.url}/openapi.json", timeout=10).json()
    for path, model in (("/v1/completions", "CompletionRequest"),
                        ("/v1/chat/completions", "ChatCompletionRequest"),
                        ("/tokenize", "TokenizeRequest"), ("/detokenize", "DetokenizeRequest")):
        op = doc["paths"][path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model}"
        assert "400" in op["responses"] and "429" in op["responses"]
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert props["think_budget"]["maximum"] == 1 and props["temperature"]["maximum"] == 2
    assert "prompt" in doc["components"]["schemas"]["CompletionRequest"]["required"]


def test_fuzzing_finds_no_server_error(tiny_model_dir, tmp_path):
    server = launch(tiny_model_dir, tmp_path, "--max-model-len", "48", "--max-num-seqs", "4",
                    "--max-queue-len", "0")
    try:
        fuzzer = Fuzzer(server.url, MODEL_NAME, check_every=25)
        for case in hostile_cases(MODEL_NAME):
            fuzzer.send(case, case.label or "hostile")
        fuzzer.run_generated(80, seed=0)
        fuzzer.check()
        report = fuzzer.report
        assert report.server_errors == []
        assert report.failed_checks == [] and report.checks >= 4
        assert report.statuses[200] > 0 and report.statuses[400] > 0
        assert "Traceback" not in server.log()
    finally:
        assert server.stop() == 0
