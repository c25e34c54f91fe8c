"""--quantization int8 against fp32 on one model, side by side in one run.

    python scripts/bench_quant_model.py --model FILE.gguf|DIR [--rounds 3] [--threads 2]

For each mode (none = fp32, int8), in a fresh subprocess (so that its memory is its own):

- the bytes the model's weights hold once loaded (``quantization.weight_bytes``) and the
  process's resident memory (RSS) after loading, next to the GGUF file's tensor bytes;
- held-out perplexity (data/heldout.txt, 32 windows of 256 tokens, the reference forward);
- greedy decode speed through the engine (``LLM.generate``, 128 new tokens per request, no
  stop) at 1 and 8 concurrent requests: generated tokens per second, the median of
  ``--rounds`` rounds. The modes alternate round by round (A B A B …), each in its own
  process kept alive, so that a slow patch of a shared machine hits both.

Prints a markdown table with the ratios int8 / fp32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The history of the printing press begins"

WORKER = r"""
import json, os, sys, time, resource
import torch
torch.set_num_threads(int(sys.argv[3]))
from itt_runtime.llm import LLM
from itt_runtime.model.quantization import weight_bytes
from itt_runtime.sampling_params import SamplingParams
from itt_runtime.training.evaluate import evaluate_budget, text_windows
llm = LLM(model=sys.argv[1], quantization=sys.argv[2], device="cpu", dtype="float32",
          enable_prefix_caching=False)
rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
model = llm.engine.model
windows = text_windows(llm.tokenizer, open(sys.argv[4]).read(), 256)[:32]
with torch.no_grad():
    ppl = evaluate_budget(model, windows, None if not model.cfg.is_itt else
                          model.cfg.default_budget)["ppl"]
print(json.dumps({"weight_bytes": weight_bytes(model), "rss": rss, "ppl": ppl}), flush=True)
for line in sys.stdin:
    n = int(line)
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([sys.argv[5]] * n, params)
    dt = time.perf_counter() - t0
    toks = sum(len(o.outputs[0].token_ids) for o in outs)
    print(json.dumps({"streams": n, "tok_s": toks / dt}), flush=True)
"""


def gguf_tensor_bytes(path: Path) -> int | None:
    if path.suffix != ".gguf":
        return None
    from gguf import GGUFReader
    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", default="1,8")
    a = p.parse_args(argv)
    modes = ("none", "int8")
    procs = {m: subprocess.Popen(
        [sys.executable, "-c", WORKER, a.model, m, str(a.threads),
         str(ROOT / "data" / "heldout.txt"), PROMPT],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT) for m in modes}
    info = {}
    for m, proc in procs.items():           # loaded one after the other: wait for each
        assert proc.stdout is not None
        info[m] = json.loads(proc.stdout.readline())
    speed: dict[tuple[str, int], list[float]] = {}
    streams = [int(s) for s in a.streams.split(",")]
    for _ in range(a.rounds):
        for n in streams:
            for m, proc in procs.items():
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(f"{n}\n")
                proc.stdin.flush()
                speed.setdefault((m, n), []).append(json.loads(proc.stdout.readline())["tok_s"])
    for proc in procs.values():
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()
    file_bytes = gguf_tensor_bytes(Path(a.model))
    head = ["mode", "weights (MB)", "RSS (MB)", "held-out ppl",
            *[f"tok/s, {n} stream{'s' if n > 1 else ''}" for n in streams]]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for m in modes:
        med = {n: statistics.median(speed[(m, n)]) for n in streams}
        base = {n: statistics.median(speed[("none", n)]) for n in streams}
        cells = [m if m != "none" else "fp32", f"{info[m]['weight_bytes'] / 1e6:.0f}",
                 f"{info[m]['rss'] / 1e6:.0f}", f"{info[m]['ppl']:.3f}"]
        cells += [f"{med[n]:.1f} ({med[n] / base[n]:.2f}x)" for n in streams]
        print("| " + " | ".join(cells) + " |")
    if file_bytes:
        print(f"\nGGUF tensor bytes: {file_bytes / 1e6:.0f} MB; int8 weights / file: "
              f"{info['int8']['weight_bytes'] / file_bytes:.2f}x")
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, {a.threads} threads, {a.rounds} rounds "
          "interleaved; medians.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
