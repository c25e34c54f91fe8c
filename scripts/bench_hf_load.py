"""Load time and peak memory of a 1B-parameter Hugging Face Llama checkpoint.

Writes a Llama-3.2-1B-shaped checkpoint (hidden 2048, 16 layers, 32 heads, 8 KV heads, ffn
8192, vocab 128256, tied embeddings, llama3 RoPE scaling, 131072 positions) with random bf16
weights, sharded, into a temporary directory, one shard in memory at a time; then loads it with
``load_model(dir, dtype=bfloat16, fuse=True)`` (what the engine does) in a fresh subprocess and
prints the load time and the child's peak RSS (``getrusage`` maxrss) against the weights' size.
The target is a peak RSS of at most 1.3x the weights.

    python scripts/bench_hf_load.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "attention_bias": False, "mlp_bias": False,
}
LAYERS_PER_SHARD = 4


def layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    c = CONFIG
    d, hd, ffn = c["hidden_size"], c["head_dim"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    p = f"model.layers.{i}."
    return {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (ffn, d), p + "mlp.up_proj.weight": (ffn, d),
            p + "mlp.down_proj.weight": (d, ffn)}


def write_checkpoint(out: Path) -> int:
    """Write the sharded checkpoint; returns the weights' size in bytes."""
    c = CONFIG
    shards: list[dict[str, tuple[int, ...]]] = [
        {"model.embed_tokens.weight": (c["vocab_size"], c["hidden_size"]),
         "model.norm.weight": (c["hidden_size"],)}]
    for first in range(0, c["num_hidden_layers"], LAYERS_PER_SHARD):
        shard: dict[str, tuple[int, ...]] = {}
        for i in range(first, min(first + LAYERS_PER_SHARD, c["num_hidden_layers"])):
            shard.update(layer_shapes(i))
        shards.append(shard)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for n, shapes in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: (torch.randn(s, generator=g, dtype=torch.bfloat16) * 0.02)
                   for k, s in shapes.items()}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors                                   # one shard in memory at a time
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(CONFIG, indent=1))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
         "temperature": 0.6, "top_p": 0.9, "do_sample": True}))
    shutil.copyfile(REPO / "itt_runtime/checkpoints/default/tokenizer.model",
                    out / "tokenizer.model")
    return total


CHILD = """
import json, resource, sys, time
import torch
from itt_runtime.model.loader import load_model
torch.set_num_threads(2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
model, tok = load_model(sys.argv[1], dtype=torch.bfloat16, fuse=True)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
hwm = [int(line.split()[1]) * 1024 for line in open("/proc/self/status")
       if line.startswith("VmHWM:")][0]            # this process image only (maxrss is not)
params = sum(p.numel() for p in model.parameters())
print(json.dumps({"load_s": seconds, "peak_rss": peak, "rss_before_load": before,
                  "vm_hwm": hwm, "parameters": params}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", type=Path, help="write the checkpoint here and keep it")
    ap.add_argument("--write", type=Path, help=argparse.SUPPRESS)    # the writer process
    args = ap.parse_args()
    if args.write:
        print(write_checkpoint(args.write))
        return 0
    out = args.keep or Path(tempfile.mkdtemp(prefix="itt-bench-hf-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        # Written by another process, so that this one stays small: a child's maxrss starts
        # from its parent's RSS at fork.
        proc = subprocess.run([sys.executable, __file__, "--write", str(out)], check=True,
                              capture_output=True, text=True)
        size = int(proc.stdout.strip().splitlines()[-1])
        print(f"wrote {size / 2**30:.2f} GiB of bf16 weights in "
              f"{len(list(out.glob('*.safetensors')))} shards to {out} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        proc = subprocess.run([sys.executable, "-c", CHILD, str(out)], cwd=REPO,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        gib = 2**30
        print(f"parameters       {r['parameters']:,}")
        print(f"weights (bf16)   {size / gib:.2f} GiB")
        print(f"load time        {r['load_s']:.1f} s")
        print(f"peak RSS         {r['peak_rss'] / gib:.2f} GiB = "
              f"{r['peak_rss'] / size:.2f}x the weights (target <= 1.3x)")
        print(f"peak RSS (VmHWM)  {r['vm_hwm'] / gib:.2f} GiB = {r['vm_hwm'] / size:.2f}x")
        print(f"  of which the interpreter and torch before loading: "
              f"{r['rss_before_load'] / gib:.2f} GiB; loading added "
              f"{(r['peak_rss'] - r['rss_before_load']) / size:.2f}x the weights")
        assert math.isfinite(r["load_s"])
        return 0 if r["peak_rss"] <= 1.3 * size else 2
    finally:
        if args.keep is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
