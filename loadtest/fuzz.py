"""Fuzz a running itt-server: hostile hand-written requests and requests generated from the
server's own OpenAPI schema (schemathesis), checking that none gets a 5xx and that the
server stays healthy and deterministic.

    python -m loadtest.fuzz --url http://127.0.0.1:8000 --requests 2000 --out fuzz.json

Every ``--check-every`` requests it asserts ``/health`` is 200 and that a fixed greedy
completion still returns the text it returned at the start. Start the server with a small
``--max-model-len`` (and ``--max-queue-len 0``) so that generated requests stay cheap.
Exit status 1 if any request got a 5xx or any check failed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field

import httpx

POSTS = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]


@dataclass
class Case:
    method: str
    path: str
    body: bytes | None = None
    content_type: str = "application/json"
    label: str = ""


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def hostile_cases(model: str) -> list[Case]:
    """Requests an attacker or a careless client sends (see issue: hardening)."""
    C = "/v1/completions"
    chat = "/v1/chat/completions"
    base = {"model": model, "prompt": "The river", "max_tokens": 4}
    cases = [
        Case("POST", C, _json({**base, "min_tokens": 2, "stop_token_ids": [10**6]})),
        Case("POST", C, _json({**base, "min_tokens": 2, "stop_token_ids": [2**70]})),
        Case("POST", C, _json({**base, "n": 2, "temperature": 1, "seed": 2**64 - 1})),
        Case("POST", C, _json({**base, "n": 2, "temperature": 1, "seed": 2**64})),
        Case("POST", C, _json({**base, "seed": -2**63 - 1, "stream": True})),
        Case("POST", C, _json({**base, "max_tokens": 2**70})),
        Case("POST", C, _json({**base, "max_tokens": 4, "min_tokens": 5})),
        Case("POST", C, _json({**base, "top_k": 2**63, "temperature": 1})),
        Case("POST", C, _json({**base, "logprobs": 2**64})),
        Case("POST", C, _json({**base, "logprobs": 20, "echo": True})),
        Case("POST", C, _json({**base, "prompt": [1, -5]})),
        Case("POST", C, _json({**base, "prompt": [[1, 2], [3, 2**70]]})),
        Case("POST", C, _json({**base, "prompt": []})),
        Case("POST", C, _json({**base, "prompt": ["x"] * 129})),
        Case("POST", C, _json({**base, "prompt": "x" * 400_000})),
        Case("POST", C, _json({**base, "stop": ["s"] * 17})),
        Case("POST", C, _json({**base, "stop": "y" * 10_000})),
        Case("POST", C, _json({**base, "think_budget": float("nan")})),
        Case("POST", C, b'{"prompt": "x", "temperature": NaN}'),
        Case("POST", C, b'{"prompt": "x", "temperature": Infinity}'),
        Case("POST", C, _json({**base, "logit_bias": {str(i): 1 for i in range(5000)}})),
        Case("POST", C, _json({**base, "stream_options": {"include_usage": True}})),
        Case("POST", C, _json({**base, "model": "no-such-model"})),
        Case("POST", C, b'{"prompt": "a\\ud800b"}'),
        Case("POST", C, b'{"prompt": "a", "\\udfff": 1}'),
        Case("POST", C, b'{"prompt": "a", "model": "\\ud800"}'),
        Case("POST", C, b"not json"),
        Case("POST", C, b""),
        Case("POST", C, b"[]"),
        Case("POST", C, b"null"),
        Case("POST", C, b'"prompt"'),
        Case("POST", C, b'{"prompt": "x"', label="truncated"),
        Case("POST", C, _json(base), content_type="text/plain"),
        Case("POST", C, b"\xff\xfe\x00garbage"),
        Case("POST", chat, _json({"model": model, "messages": [{"role": "user",
                                                                 "content": "\ud800"}]})),
        Case("POST", chat, _json({"model": model, "messages": []})),
        Case("POST", chat, _json({"model": model, "messages": [{"role": "wizard"}]})),
        Case("POST", chat, _json({"model": model, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]})),
        Case("POST", chat, _json({"model": model, "max_tokens": 4, "n": 3, "seed": 2**64 - 1,
                                  "messages": [{"role": "user", "content": "hi"}],
                                  "stream": True})),
        Case("POST", chat, _json({"model": model, "messages": [{"role": "user", "content": "x"}],
                                  "top_logprobs": 5})),
        Case("POST", "/tokenize", b'{"prompt": "\\ud800"}'),
        Case("POST", "/tokenize", _json({"prompt": "x", "messages": []})),
        Case("POST", "/tokenize", _json({"prompt": "x" * 400_000})),
        Case("POST", "/detokenize", _json({"tokens": [2**63 - 1]})),
        Case("POST", "/detokenize", _json({"tokens": [-1]})),
        Case("GET", C), Case("PUT", "/tokenize", b"{}"), Case("GET", "/../../etc/passwd"),
        Case("POST", C, b"x" * (9 * 2**20), label="9 MiB body"),
    ]
    for path in POSTS:
        for depth in (100, 10_000, 100_000):
            cases.append(Case("POST", path, b"[" * depth + b"]" * depth))
            cases.append(Case("POST", path, b'{"a":' * depth + b"1" + b"}" * depth))
    return cases


@dataclass
class Report:
    statuses: Counter = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    checks: int = 0
    failed_checks: list[str] = field(default_factory=list)
    requests: int = 0


class Fuzzer:
    def __init__(self, url: str, model: str, check_every: int) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=120)
        self.model = model
        self.check_every = check_every
        self.report = Report()
        self.greedy = {"model": model, "prompt": "In the beginning", "max_tokens": 8,
                       "temperature": 0}
        self.expected = self.http.post("/v1/completions", json=self.greedy).json()[
            "choices"][0]["text"]

    def send(self, case: Case, label: str) -> None:
        try:
            resp = self.http.request(case.method, case.path, content=case.body,
                                     headers={"Content-Type": case.content_type})
            status = resp.status_code
            text = resp.text
        except httpx.HTTPError as e:
            status, text = 0, f"transport error: {e!r}"
        self.record(status, f"{label} {case.method} {case.path}: {text[:300]}")

    def record(self, status: int, what: str) -> None:
        self.report.statuses[status] += 1
        self.report.requests += 1
        if status >= 500 or status == 0:
            self.report.server_errors.append(f"{status} {what}")
        if self.report.requests % self.check_every == 0:
            self.check()

    def check(self) -> None:
        self.report.checks += 1
        try:
            health = self.http.get("/health").status_code
            text = self.http.post("/v1/completions", json=self.greedy).json()[
                "choices"][0]["text"]
        except (httpx.HTTPError, KeyError, ValueError) as e:
            self.report.failed_checks.append(f"after {self.report.requests}: {e!r}")
            return
        if health != 200 or text != self.expected:
            self.report.failed_checks.append(
                f"after {self.report.requests}: health {health}, greedy {text!r}")

    def run_generated(self, count: int, seed: int) -> None:
        """``count`` requests generated from /openapi.json, spread over the POST routes."""
        import schemathesis
        warnings.simplefilter("ignore")
        schema = schemathesis.openapi.from_url(f"{self.url}/openapi.json")
        per_route = max(1, count // len(POSTS))
        for path in POSTS:
            self._run_route(path, schema[path]["POST"].as_strategy(), per_route)

    def _run_route(self, path: str, strategy, count: int) -> None:
        from hypothesis import HealthCheck, Phase, given, settings
        sent = 0

        @settings(max_examples=count * 4, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=[Phase.generate])
        @given(strategy)
        def one(case) -> None:
            nonlocal sent
            if sent >= count:
                return
            sent += 1
            self.send(Case("POST", path, json.dumps(case.body).encode()
                           if case.body is not None else b""), "generated")
        one()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.fuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="default")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--check-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the report as JSON here")
    a = p.parse_args(argv)
    fuzzer = Fuzzer(a.url, a.model, a.check_every)
    hostile = hostile_cases(a.model)
    n_hostile = min(len(hostile) * 4, a.requests // 2)
    for case in itertools.islice(itertools.cycle(hostile), n_hostile):
        fuzzer.send(case, case.label or "hostile")
    fuzzer.run_generated(a.requests - n_hostile, a.seed)
    fuzzer.check()
    r = fuzzer.report
    summary = {"requests": r.requests, "hostile": n_hostile,
               "generated": r.requests - n_hostile,
               "by_status": dict(sorted(r.statuses.items())),
               "server_errors": r.server_errors[:20], "num_server_errors": len(r.server_errors),
               "checks": r.checks, "failed_checks": r.failed_checks}
    text = json.dumps(summary, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 1 if r.server_errors or r.failed_checks else 0


if __name__ == "__main__":
    sys.exit(main())
