"""Throughput with and without structured outputs, same server, same run: ``--streams`` concurrent
streamed completions of ``--max-tokens`` tokens each, plain (ignore_eos) and constrained by a
JSON schema that cannot complete within that many tokens (so both phases generate exactly the
same number of tokens). Phases alternate over ``--rounds`` rounds; the report is the median
tokens/s of each, their ratio, and the median of the per-round ratios (robust to load drifting on
a shared machine).

    python scripts/bench_structured.py                   # starts the default model on CPU
    python scripts/bench_structured.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SCHEMA = {"type": "array", "minItems": 64, "items": {
    "type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"enum": ["new", "old", "red", "blue"]},
                 "maxItems": 2}},
    "required": ["name", "score", "tags"], "additionalProperties": False}}


async def one(client: httpx.AsyncClient, body: dict) -> int:
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    return tokens


async def phase(client: httpx.AsyncClient, streams: int, body: dict) -> float:
    t0 = time.perf_counter()
    tokens = await asyncio.gather(*(one(client, {**body, "seed": i}) for i in range(streams)))
    return sum(tokens) / (time.perf_counter() - t0)


async def bench(url: str, args) -> None:
    base = {"prompt": "A list of players in JSON:", "max_tokens": args.max_tokens,
            "temperature": 1.0, "stream": True, "stream_options": {"include_usage": True}}
    plain = {**base, "ignore_eos": True}
    schema = {**base, "response_format": {"type": "json_schema", "json_schema": {
        "name": "players", "schema": SCHEMA, "strict": True}}}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await phase(client, 1, {**schema, "max_tokens": 8})          # warm-up and compile
        await phase(client, 1, {**plain, "max_tokens": 8})
        results: dict[str, list[float]] = {"plain": [], "json_schema": []}
        for r in range(args.rounds):
            order = [("plain", plain), ("json_schema", schema)]
            for name, body in order if r % 2 == 0 else order[::-1]:
                tps = await phase(client, args.streams, body)
                results[name].append(tps)
                print(f"round {r + 1} {name:11s} {tps:8.1f} tok/s", flush=True)
    p, s = statistics.median(results["plain"]), statistics.median(results["json_schema"])
    # Rounds run back to back, so a round's ratio cancels slow drifts of a shared machine.
    paired = statistics.median(b / a for a, b in zip(results["plain"],
                                                     results["json_schema"]))
    print(f"\n{args.streams} streams x {args.max_tokens} tokens, {args.rounds} rounds: "
          f"median plain {p:.1f} tok/s, json_schema {s:.1f} tok/s (ratio {s / p:.3f}); "
          f"median per-round ratio {paired:.3f} (overhead {100 * (1 - paired):.1f}%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running server; default: start the default model")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.url:
        asyncio.run(bench(args.url, args))
        return
    from live_server import launch
    server = launch("default", Path(tempfile.mkdtemp()), "--device", args.device,
                    served_name=None, ready_timeout=300)
    try:
        asyncio.run(bench(server.url, args))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
