"""itt-bench: offline engine benchmarks. Every comparison is a ratio measured in the same run.

    itt-bench [--model DIR|default] [--tokens 64] [--json OUT]

1. aggregate decode tokens/s at 1, 8, 32, 64 concurrent sequences;
2. single stream: this engine vs HF transformers ``generate`` (dense config, same weights)
   and vs a naive loop that recomputes the whole sequence every token;
3. time per decode step at think budgets 0 … 1 (batch 32) vs the FLOP ratio of ITT_SPEC;
4. KV bytes per token at each budget vs the ITT_SPEC formula.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from itt_runtime.engine.llm_engine import EngineConfig, LLMEngine
from itt_runtime.model.hf import to_hf_name
from itt_runtime.model.loader import load_model, save_model
from itt_runtime.sampling_params import SamplingParams
from itt_runtime.training.data import encode_documents

PROMPT = "And it came to pass, when the king heard these words, that he"


def run_batch(eng: LLMEngine, prompt_ids, n_seqs: int, max_tokens: int, budget=None):
    """Admit ``n_seqs`` greedy requests, finish their prefill, then time the decode steps.
    Returns (decode tokens/s, seconds per decode step)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                            think_budget=budget)
    for i in range(n_seqs):
        eng.add_request(f"b{i}-{time.monotonic_ns()}", prompt_ids, params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.scheduler.running) \
            or eng.scheduler.waiting:
        eng.step()
    steps, tokens, t0 = 0, 0, time.perf_counter()
    while eng.has_unfinished():
        tokens += len(eng.scheduler.running)
        eng.step()
        steps += 1
    dt = time.perf_counter() - t0
    return tokens / dt, dt / max(steps, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_dense_generate(model_dir: Path, prompt_ids, max_tokens: int, device: torch.device,
                      dtype: torch.dtype, repeats: int = 2) -> float:
    """Tokens/s of HF LlamaForCausalLM.generate on the dense version of the weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    model, _ = load_model(model_dir)
    c = model.cfg
    hf = LlamaForCausalLM(LlamaConfig(  # type: ignore[call-arg]
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_dim,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings,
        attention_bias=False, mlp_bias=False)).eval()
    sd = {name: v for k, v in model.state_dict().items() if (name := to_hf_name(k))}
    hf.load_state_dict(sd, strict=False)
    hf.to(device=device, dtype=dtype)
    ids = torch.tensor([prompt_ids], device=device)
    best = 0.0
    with torch.no_grad():
        for _ in range(repeats + 1):               # the first run warms up (CUDA: kernels)
            sync(device)
            t0 = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                              do_sample=False, pad_token_id=0)
            sync(device)
            best = max(best, (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0))
    return best


def naive_generate(model_dir: Path, prompt_ids, max_tokens: int, device: torch.device,
                   dtype: torch.dtype) -> float:
    """Tokens/s of greedy decoding that recomputes the full sequence every token."""
    model, _ = load_model(model_dir, device, dtype)
    ids = list(prompt_ids)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids], device=device)).logits[0, -1].argmax()))
    return max_tokens / (time.perf_counter() - t0)


def dense_copy(model_dir: Path, out: Path) -> Path:
    """The same backbone weights with the ITT parts removed (a plain LLaMA)."""
    model, _ = load_model(model_dir)
    from itt_runtime.model.itt import ITTModel
    dense = ITTModel(dataclasses.replace(model.cfg, itt_layers=(), think_steps=1,
                                         calibration=None))
    dense.load_state_dict({k: v for k, v in model.state_dict().items()
                           if ".phi" not in k and ".routers." not in k})
    return save_model(dense, model_dir / "tokenizer.model", out)


def kv_bytes(eng: LLMEngine, prompt_ids, max_tokens: int, budget: float) -> tuple[float, float]:
    """(bytes per token of stored K/V, bytes per token of allocated blocks) just before the
    requests finish."""
    eng.add_request("kv", prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                     ignore_eos=True, think_budget=budget))
    seq = eng.requests["kv"].seqs[0]
    while len(seq.output_token_ids) < max_tokens - 1:
        eng.step()
    kv = eng.kv.get("kv")
    per_slot = eng.cache.bytes_per_block(1, eng.model_config.n_kv_heads,
                                         eng.model_config.head_dim, eng.dtype)
    stored = sum(kv.lengths) * per_slot / kv.lengths[0]
    allocated = kv.num_blocks * eng.config.block_size * per_slot / kv.lengths[0]
    eng.abort("kv")
    return stored, allocated


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="itt-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--tokens", type=int, default=64, help="decode tokens per sequence")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: no CUDA graphs (section 2 on CUDA shows both anyway)")
    p.add_argument("--routed-compute", default="auto", choices=["auto", "gather", "masked"])
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--sections", default="1,2,3,4", help="which benchmarks to run")
    a = p.parse_args(argv)
    eng = LLMEngine(engine_config(a, a.model, max_num_seqs=128, max_num_batched_tokens=4096))
    model_dir = eng.model_path
    prompt = eng.tokenizer.encode(PROMPT)
    res: dict = {"model": str(model_dir), "device": str(eng.device),
                 "dtype": str(eng.dtype).replace("torch.", ""), "threads": torch.get_num_threads()}
    run_batch(eng, prompt, 4, 8)                                       # warm-up

    print(f"# itt-bench on {res['device']} ({res['dtype']}, {res['threads']} threads), "
          f"{a.tokens} decode tokens per sequence")
    sections = set(a.sections.split(","))
    if "1" in sections:
        bench_concurrency(eng, prompt, a, res)
    if "2" in sections:
        bench_single_stream(eng, model_dir, prompt, a, res)
    if "3" in sections:
        bench_budgets(eng, prompt, a, res)
    if "4" in sections:
        bench_kv_bytes(eng, res)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return 0


def engine_config(a, model, **overrides) -> EngineConfig:
    """The engine every section measures: decode steps one token at a time (speculation, on
    by default on CPU, would fold several into a step)."""
    return EngineConfig(**{"model": str(model), "device": a.device, "dtype": a.dtype,
                           "enforce_eager": a.enforce_eager,
                           "routed_compute": a.routed_compute, "speculative_config": "off",
                           **overrides})


def bench_concurrency(eng, prompt, a, res) -> None:
    print("\n## 1. decode throughput vs concurrency (default budget)")
    counts = [int(x) for x in a.concurrency.split(",")]
    conc = {n: 0.0 for n in counts}
    for _ in range(2):                  # interleaved repeats; keep each point's best
        for n in counts:
            conc[n] = max(conc[n], run_batch(eng, prompt, n, a.tokens)[0])
    single = conc[min(conc)]
    for n, tps in conc.items():
        print(f"  {n:3d} seqs: {tps:9.1f} tok/s   x{tps / single:5.2f} vs 1 seq")
    res["decode_tok_s"] = conc


def bench_single_stream(eng, model_dir, prompt, a, res) -> None:
    print("\n## 2. single stream vs HF transformers generate and a no-cache loop (dense)")
    dev, dtype = eng.device, eng.dtype
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir = dense_copy(model_dir, Path(tmp) / "dense")
        engines = {"itt engine": engine_config(a, dense_dir)}
        if dev.type == "cuda" and not a.enforce_eager:
            engines["itt engine, eager"] = engine_config(a, dense_dir, enforce_eager=True)
        figures = {}
        for name, config in engines.items():
            dense_eng = LLMEngine(config)
            run_batch(dense_eng, prompt, 1, 8)
            figures[name] = max(run_batch(dense_eng, prompt, 1, a.tokens)[0] for _ in range(2))
        hf = hf_dense_generate(dense_dir, prompt, a.tokens, dev, dtype)
        naive = naive_generate(dense_dir, prompt, a.tokens, dev, dtype)
    ours = figures["itt engine"]
    for name, tps in figures.items():
        print(f"  {name:<18}: {tps:8.1f} tok/s")
    print(f"  HF generate       : {hf:8.1f} tok/s   engine is x{ours / hf:.2f}")
    print(f"  no cache          : {naive:8.1f} tok/s   engine is x{ours / naive:.2f}")
    res["single_stream"] = {"engine": ours, "hf_generate": hf, "naive": naive,
                            "engine_eager": figures.get("itt engine, eager")}


def bench_budgets(eng, prompt, a, res) -> None:
    mc = eng.model_config
    print("\n## 3. decode step time vs think budget (batch 32)")
    budgets = (0.0, 0.25, 0.5, 0.75, 1.0)
    runs: dict[float, list[float]] = {b: [] for b in budgets}
    for _ in range(3):                  # interleaved repeats; keep each budget's best
        for b in budgets:
            runs[b].append(run_batch(eng, prompt, 32, a.tokens, budget=b)[1])
    step = {b: min(ts) for b, ts in runs.items()}
    # FLOPs per token: 2·params per block application, plus the LM head (a constant).
    block = 2 * sum(p.numel() for p in eng.model.layers[0].block.parameters())
    head = 2 * mc.d_model * mc.vocab_size
    print("  FLOP ratio: ITT_SPEC's block applications (n_layers + b·extra) / n_layers, and the"
          " whole model with its LM head")
    for b, t in step.items():
        apps = mc.n_layers + b * mc.max_extra_steps
        spec = apps / mc.n_layers
        whole = (apps * block + head) / (mc.n_layers * block + head)
        print(f"  b={b:4.2f}: {t * 1e3:7.2f} ms/step  measured x{t / step[0.0]:4.2f}  "
              f"FLOP ratio x{spec:4.2f} (blocks) x{whole:4.2f} (with LM head)")
    res["step_s"] = step


def bench_kv_bytes(eng, res) -> None:
    print("\n## 4. KV bytes per token vs ITT_SPEC formula")
    kvres = {}
    heldout = Path(__file__).resolve().parent.parent / "data" / "heldout.txt"
    text = heldout.read_text() if heldout.exists() else PROMPT * 200
    ids = encode_documents(eng.tokenizer, text)      # as in training: BOS text EOS …
    # Stay inside the default model's training context (256 tokens).
    length = min(eng.max_model_len, 256)
    long_prompt = ids[: length * 3 // 4]
    mc = eng.model_config
    base = eng.kv_bytes_per_token(0.0)
    print("  stored: K/V slots in use; allocated: whole blocks (incl. partly filled ones).")
    for b in (0.0, 0.25, 0.5, 0.75, 1.0):
        stored, alloc = kv_bytes(eng, long_prompt, length // 4, b)
        formula = eng.kv_bytes_per_token(b)
        routed = (stored / base - 1) * mc.n_layers / max(mc.max_extra_steps, 1)
        kvres[b] = {"stored": stored, "allocated": alloc, "formula": formula,
                    "routed_fraction": routed}
        print(f"  b={b:4.2f}: formula {formula:7.0f} B/tok | stored {stored:7.0f} "
              f"(x{stored / formula:5.3f}; routed fraction {routed:.3f}) | allocated "
              f"{alloc:7.0f} (x{alloc / formula:5.3f}, x{alloc / stored:5.3f} of stored)")
    res["kv_bytes_per_token"] = kvres


if __name__ == "__main__":
    sys.exit(main())
