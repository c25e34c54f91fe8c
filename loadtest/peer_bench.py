"""itt-server against llama.cpp's ``llama-server`` (and itt-server configurations against each
other) on the same weights, through HTTP with one client, side by side.

    python -m loadtest.export_llama /tmp/itt-llama                  # the weights, as LLaMA
    python convert_hf_to_gguf.py /tmp/itt-llama --outtype f32 --outfile /tmp/itt-f32.gguf
    python -m loadtest.peer_bench --gguf /tmp/itt-f32.gguf \\
        --llama-server PATH/llama-server \\
        --itt compiled=--compile=on --itt eager=--compile=off --itt before@/tmp/start=

Every server gets the same requests: streaming ``/v1/completions``, prompts of exactly
``--prompt-tokens`` token ids (random ids, new ones every round so that no prefix cache
hits), ``--output-tokens`` tokens each with ``ignore_eos`` (both servers honour it), greedy.
itt-server runs at think budget 0 (``think_budget: 0``), which computes what the exported
LLaMA computes up to the φ_0 fold (loadtest/export_llama.py); ``--think-budget`` sets another
(itt-server only: its thinking costs compute llama-server does not do). At each concurrency c the
client keeps c requests in flight until ``--requests-per-stream`` × c have finished.

Rounds are interleaved (round r runs every concurrency on every server, in an order rotated
each round) because the machine is shared; figures are medians over rounds. Each server
first gets one untimed warm-up pass at every concurrency. An itt-server is measured once its
compiled decode steps are ready (``--compile auto``, the default: the start waits for them;
``on``: they compile before it listens), and its log's compile lines are reported. Memory:
each server's resident set (VmRSS) after warm-up and its peak (VmHWM) at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.client import OpenAIClient, RequestResult
from loadtest.servers import free_port, stop_process, wait_compiled, wait_ready
from loadtest.workload import RequestSpec

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Server:
    name: str
    cmd: list[str]
    env: dict[str, str]
    extra_body: dict                        # fields every request to this server carries
    cwd: Path = REPO                        # where it runs (another checkout: its own code)
    port: int = 0
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    results: dict[int, list[dict]] = field(default_factory=dict)   # concurrency -> rounds
    memory: dict[str, float] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path, timeout_s: float) -> None:
        self.log_path = log_dir / f"{self.name}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, stdout=log,
                                         stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env})
        wait_ready(f"{self.url}/health", self.proc, self.log_path, timeout_s)
        if self.name.startswith("itt"):        # measured at its compiled speed
            wait_compiled(self.url, self.proc, self.log_path, timeout_s)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 30)

    def read_memory(self, key: str, field_name: str) -> None:
        """VmRSS / VmHWM of the server process, MiB."""
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        m = re.search(rf"^{field_name}:\s+(\d+) kB", status, re.M)
        if m:
            self.memory[key] = int(m.group(1)) / 1024


class TokenClient(OpenAIClient):
    """Prompts as token ids, plus per-server fields (think_budget for itt-server)."""

    def __init__(self, base_url: str, extra_body: dict) -> None:
        super().__init__(base_url, model="bench", ignore_eos=True)
        self.extra_body = extra_body
        self.prompts: dict[int, list[int]] = {}

    def payload(self, spec: RequestSpec) -> dict:
        body = super().payload(spec)
        body.pop("return_thinking", None)
        body["prompt"] = self.prompts[spec.index]
        return {**body, **self.extra_body}


async def run_level(server: Server, prompts: list[list[int]], concurrency: int,
                    output_tokens: int) -> dict:
    """``len(prompts)`` requests, ``concurrency`` in flight. Returns the figures."""
    client = TokenClient(server.url, server.extra_body)
    client.prompts = dict(enumerate(prompts))
    queue = list(range(len(prompts)))
    results: list[RequestResult] = []

    async def worker() -> None:
        while queue:
            i = queue.pop()
            results.append(await client.send(RequestSpec(i, "", output_tokens, None)))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    end = max(r.start + r.latency for r in results)
    await client.aclose()
    failed = [r for r in results if not r.success]
    if failed:
        raise RuntimeError(f"{server.name}: {len(failed)} requests failed, e.g. "
                           f"{failed[0].status} {failed[0].error}")
    short = [r.output_tokens for r in results if r.output_tokens != output_tokens]
    if short:
        raise RuntimeError(f"{server.name}: requests returned {short[:5]} tokens, not "
                           f"{output_tokens} (ignore_eos not honoured?)")
    itl = [g for r in results for g in r.itl]
    tokens = sum(r.output_tokens for r in results)
    return {"tok_s": tokens / (end - start), "itl_p50_ms": statistics.median(itl) * 1e3,
            "ttft_p50_ms": statistics.median(r.ttft for r in results) * 1e3}


def random_prompts(rng: random.Random, n: int, length: int, vocab: int) -> list[list[int]]:
    """Token ids away from the special ones (0 … 2 in this project's tokenizers)."""
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


def compile_lines(server: Server) -> list[str]:
    if server.log_path is None or not server.log_path.exists():
        return []
    return [ln.strip() for ln in server.log_path.read_text(errors="replace").splitlines()
            if "compiled a decode step" in ln or re.search(r"decode step \(.*\) ready", ln)]


def build_servers(a) -> list[Server]:
    servers = []
    threads = str(a.threads)
    for spec in a.itt:
        name, _, args = spec.partition("=")
        name, _, src = name.partition("@")
        cmd = [sys.executable, "-m", "server", "--model", a.model, "--host", "127.0.0.1",
               "--device", "cpu", "--served-model-name", "bench", "--max-num-seqs",
               str(max(64, max(a.concurrency))), *args.split()]
        servers.append(Server(f"itt-{name}" if name else "itt", cmd,
                              {"OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"},
                              {"think_budget": a.think_budget}, cwd=Path(src) if src else REPO))
    if a.gguf:
        slots = max(a.concurrency)
        ctx = slots * (a.prompt_tokens + a.output_tokens + 16)
        cmd = [a.llama_server, "-m", a.gguf, "--host", "127.0.0.1", "--threads", threads,
               "--threads-batch", threads, "-np", str(slots), "-c", str(ctx), "--no-webui"]
        servers.append(Server("llama-server", cmd, {}, {}))
    return servers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.peer_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="itt-server model")
    p.add_argument("--itt", action="append", default=None, metavar="NAME[@DIR]=ARGS",
                   help="an itt-server configuration: a name and its extra flags, run from "
                        "checkout DIR if given (e.g. `git archive START | tar -x -C DIR` "
                        "for the code before a change); repeatable; default: one server "
                        "with no extra flags")
    p.add_argument("--gguf", help="the exported weights as GGUF, for llama-server")
    p.add_argument("--think-budget", type=float, default=0.0,
                   help="itt-server requests' think budget (0: what the exported LLaMA "
                        "computes; llama-server is always that)")
    p.add_argument("--llama-server", default="llama-server", help="llama-server binary")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests-per-stream", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads per server (default: every core)")
    p.add_argument("--vocab", type=int, default=8192, help="prompt ids are drawn below this")
    p.add_argument("--log-dir", type=Path, default=Path("peer_bench_logs"))
    p.add_argument("--json", type=Path, help="also write every figure here")
    p.add_argument("--ready-timeout", type=float, default=600)
    a = p.parse_args(argv)
    a.concurrency = [int(c) for c in a.concurrency.split(",")]
    a.itt = a.itt or ["="]
    a.log_dir.mkdir(parents=True, exist_ok=True)
    servers = build_servers(a)
    rng = random.Random(0)
    try:
        for s in servers:
            s.port = free_port()
            s.cmd += ["--port", str(s.port)]
            s.start(a.log_dir, a.ready_timeout)
            print(f"# {s.name} ready on {s.url}", flush=True)
        for s in servers:                   # warm-up (compiles happen here), untimed
            for c in a.concurrency:
                prompts = random_prompts(rng, c, a.prompt_tokens, a.vocab)
                asyncio.run(run_level(s, prompts, c, a.output_tokens))
            s.read_memory("rss_after_warmup_mib", "VmRSS")
        load = os.getloadavg()[0]
        for r in range(a.rounds):
            for c in a.concurrency:
                prompts = random_prompts(rng, c * a.requests_per_stream, a.prompt_tokens,
                                         a.vocab)
                order = servers[r % len(servers):] + servers[:r % len(servers)]
                for s in order:
                    fig = asyncio.run(run_level(s, prompts, c, a.output_tokens))
                    s.results.setdefault(c, []).append(fig)
                    print(f"round {r} c={c:3d} {s.name:16s} {fig['tok_s']:8.1f} tok/s  "
                          f"ITL p50 {fig['itl_p50_ms']:6.2f} ms", flush=True)
        for s in servers:
            s.read_memory("peak_rss_mib", "VmHWM")
    finally:
        for s in servers:
            s.stop()
    report(servers, a, (load + os.getloadavg()[0]) / 2)
    return 0


def report(servers: list[Server], a, load: float) -> None:
    med = {s.name: {c: {k: statistics.median(f[k] for f in s.results[c])
                        for k in ("tok_s", "itl_p50_ms", "ttft_p50_ms")}
                    for c in a.concurrency} for s in servers}
    print(f"\n# medians over {a.rounds} interleaved rounds; load average during the run "
          f"≈ {load:.1f} on {os.cpu_count()} cores")
    head = " | ".join(f"c={c} tok/s" for c in a.concurrency)
    print(f"| server | {head} | ITL p50 at c=1 | RSS after warm-up / peak (MiB) |")
    print("|---|" + "---|" * (len(a.concurrency) + 2))
    for s in servers:
        m = med[s.name]
        figs = " | ".join(f"{m[c]['tok_s']:.1f}" for c in a.concurrency)
        mem = (f"{s.memory.get('rss_after_warmup_mib', 0):.0f} / "
               f"{s.memory.get('peak_rss_mib', 0):.0f}")
        print(f"| {s.name} | {figs} | {m[a.concurrency[0]]['itl_p50_ms']:.2f} ms | {mem} |")
    names = [s.name for s in servers]
    print("\nratios (row / column, tok/s at each concurrency):")
    for x in names:
        for y in names:
            if x != y:
                ratios = " / ".join(f"{med[x][c]['tok_s'] / med[y][c]['tok_s']:.2f}"
                                    for c in a.concurrency)
                print(f"  {x} / {y}: {ratios}")
    for s in servers:
        for line in compile_lines(s):
            print(f"  {s.name}: {line}")
    if a.json:
        a.json.write_text(json.dumps({"medians": med, "rounds": {s.name: s.results
                                                                 for s in servers},
                                      "memory": {s.name: s.memory for s in servers},
                                      "load": load}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
