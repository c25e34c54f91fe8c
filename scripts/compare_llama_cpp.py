"""itt-server against llama.cpp on the same GGUF file: held-out perplexity and greedy
agreement.

Perplexity as ``llama-perplexity`` computes it, replicated with the engine: the text
tokenized whole (BOS first where the vocabulary adds one), cut into chunks of ``--ctx``
tokens (each starting with BOS where it adds one), and in each chunk only the second half's
tokens scored (their logprob given everything before them in the chunk). llama.cpp's figure
is read from ``llama-perplexity``'s "Final estimate". Greedy agreement: the same held-out
prompts completed greedily by ``llama-server`` (``/completion``, temperature 0) and by the
engine; reported as identical completions and as the mean length of the identical prefix.

    python scripts/compare_llama_cpp.py --gguf FILE.gguf --llama-bin DIR
"""

from __future__ import annotations

import argparse
import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from itt_runtime.llm import LLM
from itt_runtime.sampling_params import SamplingParams

HELDOUT = Path(__file__).resolve().parent.parent / "data" / "heldout.txt"


def our_perplexity(llm: LLM, text: str, ctx: int, chunks: int) -> float:
    tok = llm.engine.tokenizer
    bos = tok.add_bos_token
    ids = tok.encode(text, add_bos=bos)
    first = ctx // 2
    prompts = []
    for i in range(min(chunks, len(ids) // ctx)):
        chunk = ids[i * ctx:(i + 1) * ctx]
        if bos:
            chunk[0] = tok.bos_token_id
        prompts.append(chunk)
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0))
    nll, n = 0.0, 0
    for chunk, out in zip(prompts, outs):
        for j in range(first + 1, ctx):
            nll -= out.prompt_logprobs[j][chunk[j]]
            n += 1
    return math.exp(nll / n)


def llama_perplexity(binary: Path, gguf: Path, text_file: Path, ctx: int, chunks: int) -> float:
    proc = subprocess.run([str(binary), "-m", str(gguf), "-f", str(text_file), "-c", str(ctx),
                           "--chunks", str(chunks), "-t", "1", "-b", str(ctx)],
                          capture_output=True, text=True, timeout=3600)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", proc.stdout + proc.stderr)
    if not found:
        raise RuntimeError(f"llama-perplexity gave no estimate:\n{proc.stderr[-2000:]}")
    return float(found.group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_greedy(binary: Path, gguf: Path, prompts: list[str], n: int) -> list[str]:
    port = free_port()
    server = subprocess.Popen([str(binary), "-m", str(gguf), "--port", str(port), "-t", "1",
                               "-c", "2048", "--no-webui"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        out = []
        for prompt in prompts:
            body = json.dumps({"prompt": prompt, "n_predict": n, "temperature": 0,
                               "top_k": 1, "cache_prompt": False}).encode()
            req = urllib.request.Request(f"{url}/completion", body,
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                out.append(json.loads(r.read())["content"])
        return out
    finally:
        server.terminate()
        server.wait(timeout=30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--llama-bin", type=Path, required=True,
                   help="the folder with llama-perplexity and llama-server")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--tokens", type=int, default=32)
    a = p.parse_args(argv)
    llm = LLM(str(a.gguf), device="cpu")
    ours = our_perplexity(llm, HELDOUT.read_text(), a.ctx, a.chunks)
    theirs = llama_perplexity(a.llama_bin / "llama-perplexity", a.gguf, HELDOUT, a.ctx,
                              a.chunks)
    print(f"perplexity ({a.chunks} chunks of {a.ctx}, second halves scored): itt-server "
          f"{ours:.4f}, llama.cpp {theirs:.4f}, ratio {ours / theirs:.4f}")
    lines = [ln for ln in HELDOUT.read_text().splitlines() if len(ln.split()) > 8]
    prompts = [" ".join(line.split()[:12]) for line in lines[-a.prompts:]]
    mine = [o.outputs[0].text for o in llm.generate(
        prompts, SamplingParams(max_tokens=a.tokens, temperature=0.0))]
    theirs_text = llama_greedy(a.llama_bin / "llama-server", a.gguf, prompts, a.tokens)
    same = sum(x == y for x, y in zip(mine, theirs_text))
    prefix = [len(_common_prefix(x, y)) / max(len(y), 1) for x, y in zip(mine, theirs_text)]
    print(f"greedy ({a.tokens} tokens): identical on {same}/{len(prompts)} prompts; identical "
          f"prefix {100 * sum(prefix) / len(prefix):.0f} % of llama.cpp's text on average")
    for x, y in zip(mine, theirs_text):
        if x != y:
            print(f"  ours:      {x!r}\n  llama.cpp: {y!r}", file=sys.stderr)
    return 0


def _common_prefix(a: str, b: str) -> str:
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return a[:i]


if __name__ == "__main__":
    raise SystemExit(main())
