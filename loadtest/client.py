"""One request against an OpenAI-compatible server, timed the way vLLM's `bench serve` times it
(backend_request_func.py):

- TTFT: from sending the request to the first chunk that carries output.
- ITL: the gaps between consecutive output-carrying chunks (a chunk with several tokens is one
  gap, as in vLLM).
- E2E latency: from sending to the *last output chunk* (not to `[DONE]`).
- output tokens: the server's `usage.completion_tokens` (from the final usage chunk when
  streaming), as vLLM; we also count tokens client-side from the per-token `thinking` lists so
  that the two can be checked against each other.

One deliberate difference: vLLM counts any chunk that has `choices`; we count chunks whose choice
carries text or thinking, so a role-only or empty finish chunk does not add a zero-length ITL.
Without streaming there is one "chunk": TTFT = E2E and there are no ITLs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from loadtest.workload import RequestSpec


@dataclass
class RequestResult:
    index: int
    think_budget: float | None
    success: bool = False
    status: str = ""               # HTTP status ("200", "400", ...) or the exception's name
    error: str = ""
    start: float = 0.0             # perf_counter() when sent
    ttft: float = 0.0              # seconds
    latency: float = 0.0           # seconds, E2E
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0         # usage.prompt_tokens
    cached_tokens: int = 0         # usage.prompt_tokens_details.cached_tokens (prefix cache)
    output_tokens: int = 0         # usage.completion_tokens (client count if usage is missing)
    counted_tokens: int = 0        # tokens seen client-side (thinking lists; else chunks)
    extra_steps: list[int] = field(default_factory=list)    # per generated token, if returned
    mean_extra_steps: float | None = None                    # usage.thinking
    mean_normalized_depth: float | None = None               # usage.thinking
    applied_think_budget: float | None = None                # usage.thinking (elastic)
    text: str = ""                 # the output (multi-turn conversations send it back)


class OpenAIClient:
    """Sends RequestSpecs to ``/v1/completions`` or ``/v1/chat/completions`` of ``base_url``."""

    def __init__(self, base_url: str, model: str, endpoint: str = "completions",
                 stream: bool = True, api_key: str | None = None, ignore_eos: bool = False,
                 timeout: float = 300.0, max_connections: int = 1024,
                 transport: httpx.AsyncBaseTransport | None = None,
                 min_think_budget: float | None = None) -> None:
        if endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be 'completions' or 'chat', got {endpoint!r}")
        self.model, self.endpoint = model, endpoint
        self.stream, self.ignore_eos = stream, ignore_eos
        self.min_think_budget = min_think_budget     # elastic thinking: the floor of each request
        self.path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=headers, timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections),
            transport=transport)            # tests pass an httpx.MockTransport

    async def aclose(self) -> None:
        await self.http.aclose()

    def payload(self, spec: RequestSpec) -> dict:
        body: dict = {"model": self.model, "max_tokens": spec.max_tokens, "temperature": 0.0,
                      "stream": self.stream, "return_thinking": True}
        if self.endpoint == "completions":
            body["prompt"] = spec.prompt
        elif spec.messages is not None:
            body["messages"] = list(spec.messages)
        else:
            body["messages"] = [{"role": "user", "content": spec.prompt}]
        if spec.stop and self.endpoint == "completions":    # chat stops at its turn's end
            body["stop"] = list(spec.stop)
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if spec.think_budget is not None:
            body["think_budget"] = spec.think_budget
        if self.min_think_budget is not None:
            body["min_think_budget"] = self.min_think_budget
        if self.ignore_eos:
            body["ignore_eos"] = True        # vLLM extension: outputs of exactly max_tokens
        return body

    async def send(self, spec: RequestSpec) -> RequestResult:
        """Never raises for request failures: they come back as success=False with a status."""
        res = RequestResult(spec.index, spec.think_budget)
        res.start = time.perf_counter()
        try:
            async with self.http.stream("POST", self.path, json=self.payload(spec)) as resp:
                res.status = str(resp.status_code)
                if resp.status_code != 200:
                    res.error = (await resp.aread()).decode(errors="replace")[:500]
                    return res
                if self.stream:
                    await self._read_stream(resp, res)
                    if not res.success:
                        res.status, res.error = "no output", "stream ended without output"
                else:
                    body = await resp.aread()
                    res.ttft = res.latency = time.perf_counter() - res.start
                    data = json.loads(body)
                    self._take_output(data["choices"][0], res)
                    self._take_usage(data.get("usage"), res)
                    res.success = True
        except (httpx.HTTPError, json.JSONDecodeError, KeyError, IndexError) as exc:
            res.status = res.status if res.status not in ("", "200") else type(exc).__name__
            res.error = str(exc)[:500]
            res.success = False
        if res.success and res.output_tokens == 0:
            res.output_tokens = res.counted_tokens      # server sent no usage
        return res

    async def _read_stream(self, resp: httpx.Response, res: RequestResult) -> None:
        last = res.start
        async for line in resp.aiter_lines():
            line = line.strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("error"):
                raise httpx.HTTPError(f"error in stream: {chunk['error']}")
            choices = chunk.get("choices")
            if choices and self._take_output(choices[0], res):
                now = time.perf_counter()
                if not res.success:
                    res.ttft = now - res.start
                    res.success = True
                else:
                    res.itl.append(now - last)
                last = now
            self._take_usage(chunk.get("usage"), res)
        res.latency = last - res.start

    def _take_output(self, choice: dict, res: RequestResult) -> bool:
        """Accumulates one choice's tokens; True if it carried any output."""
        text = choice.get("text") if self.endpoint == "completions" else (
            (choice.get("delta") or choice.get("message") or {}).get("content"))
        thinking = choice.get("thinking") or []
        res.text += text or ""
        res.extra_steps.extend(thinking)
        res.counted_tokens += len(thinking) if thinking else (1 if text else 0)
        return bool(text) or bool(thinking)

    @staticmethod
    def _take_usage(usage: dict | None, res: RequestResult) -> None:
        if not usage:
            return
        res.prompt_tokens = usage.get("prompt_tokens") or 0
        res.output_tokens = usage.get("completion_tokens") or 0
        res.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        thinking = usage.get("thinking") or {}
        res.mean_extra_steps = thinking.get("mean_extra_steps")
        res.mean_normalized_depth = thinking.get("mean_normalized_depth")
        res.applied_think_budget = thinking.get("applied_think_budget")


async def first_model(base_url: str, api_key: str | None = None) -> str:
    """The first model id of GET /v1/models (what to load-test when no --model is given)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers) as http:
        resp = await http.get("/v1/models", timeout=30)
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
