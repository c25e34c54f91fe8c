"""Tiny GGUF files for tests, written with the ``gguf`` package's ``GGUFWriter`` as llama.cpp's
converter writes them, from a tiny Hugging Face directory (``hf_models.build_hf_model``):

- ``write_gguf(out, hf_dir, qtype)``: every matrix in ``qtype`` (norms and biases F32, as
  llama.cpp keeps them), llama Q/K rows permuted to llama.cpp's interleaved RoPE layout, the
  hyper-parameters as ``{arch}.*`` metadata and, given ``vocab``, the tokenizer metadata.
  Types ``gguf.quants`` can quantize are quantized; for the others (K-quants, IQ types) the
  blocks are random bytes, redrawn until they dequantize to small finite values.
  Returns the dequantized weights under their Hugging Face names, in the Hugging Face layout:
  ``write_reference_dir`` saves them as a Hugging Face directory, the reference a GGUF load
  must equal.
- ``byte_level_vocab(dir)`` / ``sentencepiece_vocab(model_file)``: the GGUF tokenizer metadata
  of a Hugging Face byte-level tokenizer.json or of a sentencepiece model.

The name table and the permutation here are written from llama.cpp's converter, separately from
``itt_runtime/model/gguf.py``, so that a mistake in one is not repeated in the other. Import as
``from gguf_files import …``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file, save_file

QUANTIZABLE = (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.TQ1_0, Q.TQ2_0,
               Q.MXFP4)
RANDOM_BLOCKS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S,
                 Q.IQ3_XXS, Q.IQ3_S, Q.IQ1_S, Q.IQ1_M, Q.IQ4_NL, Q.IQ4_XS, Q.NVFP4)
# ggml types the package does not dequantize: blocks for activations only (Q8_1, Q8_K) and
# integers.
NOT_DEQUANTIZABLE = (Q.Q8_1, Q.Q8_K, Q.I8, Q.I16, Q.I32)

TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}
IN_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
            "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    if hf_name in TOP:
        return TOP[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{IN_LAYER[module]}.{kind}"


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: each head's rows from rotate-half to interleaved."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]) \
        .swapaxes(1, 2).reshape(w.shape)


# Where each block keeps its fp16 scales (byte offsets), from gguf.quants' block layouts:
# random bytes there are mostly huge or not finite, so they are drawn small instead.
F16_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
              Q.IQ2_XXS: (0,), Q.IQ2_XS: (0,), Q.IQ2_S: (0,), Q.IQ3_XXS: (0,), Q.IQ3_S: (0,),
              Q.IQ1_S: (0,), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,)}
UE4M3_SCALES = {Q.NVFP4: (0, 1, 2, 3)}        # one unsigned e4m3 byte per 16 values


def random_blocks(shape: tuple[int, int], qtype: Q, rng: np.random.Generator,
                  bound: float = 4.0) -> np.ndarray:
    """Bytes of ``qtype`` blocks for a (rows, cols) matrix whose values are finite and at
    most ``bound``: random blocks with small scales, any bad one redrawn."""
    elems, nbytes = gguf.GGML_QUANT_SIZES[qtype]

    def draw(k: int) -> np.ndarray:
        blocks = rng.integers(0, 256, (k, nbytes), dtype=np.uint8)
        for at in F16_SCALES.get(qtype, ()):
            scale = rng.uniform(1e-5, 2e-3, k).astype(np.float16)
            blocks[:, at:at + 2] = scale.view(np.uint8).reshape(k, 2)
        for at in UE4M3_SCALES.get(qtype, ()):
            blocks[:, at] = rng.integers(0x08, 0x20, k)          # 2^-6 … 2^-4 · 1.875
        return blocks

    n = math.prod(shape) // elems
    data = draw(n)
    for _ in range(200):
        with np.errstate(invalid="ignore", over="ignore"):
            values = gguf.quants.dequantize(data, qtype).reshape(n, elems)
            bad = ~(np.isfinite(values).all(1) & (np.abs(values).max(1) <= bound))
        if not bad.any():
            return data.reshape(shape[0], -1)
        data[bad] = draw(int(bad.sum()))
    raise AssertionError(f"no small finite {qtype.name} blocks drawn")


def encode(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """``w`` (rows, cols) as ``qtype`` bytes (or F32/F16 values)."""
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(w.astype(np.float32), qtype)
    return random_blocks(w.shape, qtype, rng)


def decode(data: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    return gguf.quants.dequantize(data, qtype).reshape(shape).astype(np.float32)


def write_gguf(out: Path, hf_dir: Path, qtype: Q = Q.F32, *, vocab: dict[str, Any] | None = None,
               metadata: dict[str, Any] | None = None, drop: tuple[str, ...] = (),
               raw_types: dict[str, Q] | None = None,
               extra_tensors: dict[str, np.ndarray] | None = None,
               seed: int = 0) -> dict[str, np.ndarray]:
    """The model of ``hf_dir`` as the GGUF file ``out`` (see the module docstring);
    ``metadata``: extra or replaced keys (``{arch}`` in a key is the architecture);
    ``drop``: GGUF tensor names to leave out; ``raw_types``: GGUF tensor name -> a type to
    store it as instead (random bytes of that type, for refusal tests); ``extra_tensors``:
    more F32 tensors by GGUF name. Returns the dequantized Hugging Face state."""
    rng = np.random.default_rng(seed)
    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[cfg["architectures"][0]]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg["hidden_size"] // heads
    state = load_file(str(hf_dir / "model.safetensors"))
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kv: dict[str, Any] = {
        "general.name": "tiny test model",
        f"{arch}.context_length": cfg["max_position_embeddings"],
        f"{arch}.embedding_length": cfg["hidden_size"],
        f"{arch}.block_count": cfg["num_hidden_layers"],
        f"{arch}.feed_forward_length": cfg["intermediate_size"],
        f"{arch}.attention.head_count": heads, f"{arch}.attention.head_count_kv": kv_heads,
        f"{arch}.attention.layer_norm_rms_epsilon": float(cfg["rms_norm_eps"]),
        f"{arch}.rope.freq_base": float(rope.get("rope_theta", cfg.get("rope_theta", 1e4))),
        f"{arch}.rope.dimension_count": head_dim, f"{arch}.vocab_size": cfg["vocab_size"]}
    extra_tensors = dict(extra_tensors or {})
    if rope.get("rope_type") == "linear":
        kv[f"{arch}.rope.scaling.type"] = "linear"
        kv[f"{arch}.rope.scaling.factor"] = float(rope["factor"])
    elif rope.get("rope_type") == "llama3":
        extra_tensors.setdefault("rope_freqs.weight", llama3_rope_factors(
            head_dim, kv[f"{arch}.rope.freq_base"], rope))
        if rope["original_max_position_embeddings"] != 8192:     # llama.cpp assumes 8192
            kv[f"{arch}.rope.scaling.original_context_length"] = \
                rope["original_max_position_embeddings"]
    kv.update(vocab or {})
    kv.update({k.format(arch=arch): v for k, v in (metadata or {}).items()})
    w = gguf.GGUFWriter(str(out), kv.pop("general.architecture", arch))
    for key, value in kv.items():
        _add(w, key, value)
    for name, value in extra_tensors.items():
        w.add_tensor(name, value)
    dequantized = {}
    for name, value in state.items():
        target = gguf_name(name)
        if target in drop:
            continue
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            value = permute_rope(value, heads if ".q_proj." in name else kv_heads)
        kind = (raw_types or {}).get(target, qtype if value.ndim == 2 else Q.F32)
        data = encode(value, kind, rng) if kind in QUANTIZABLE + RANDOM_BLOCKS else \
            rng.integers(0, 256, (value.shape[0], value.shape[-1] // gguf.GGML_QUANT_SIZES[
                kind][0] * gguf.GGML_QUANT_SIZES[kind][1]), dtype=np.uint8)
        raw = None if data.dtype in (np.float32, np.float16) else kind
        w.add_tensor(target, data, raw_dtype=raw)
        if kind in QUANTIZABLE + RANDOM_BLOCKS:
            values = decode(data, kind, value.shape)
            if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
                values = unpermute(values, heads if ".q_proj." in name else kv_heads)
            dequantized[name] = values
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dequantized


def llama3_rope_factors(head_dim: int, theta: float, rope: dict) -> np.ndarray:
    """The divisor of each RoPE frequency, as llama.cpp's converter writes Llama 3.1's
    scaling (``rope_freqs.weight``)."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of ``permute_rope``, from its index map (permuting the row numbers)."""
    rows = np.arange(w.shape[0])
    order = permute_rope(rows, n_heads)              # new row i holds old row order[i]
    inverse = np.empty_like(order)
    inverse[order] = rows
    return w[inverse]


def _add(w: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, list) and value and isinstance(value[0], str):
        w.add_array(key, value)
    elif isinstance(value, list) and value and isinstance(value[0], float):
        w.add_array(key, [float(v) for v in value])
    else:
        w.add_key_value(key, [int(v) for v in value], gguf.GGUFValueType.ARRAY,
                        sub_type=gguf.GGUFValueType.INT32)


def write_reference_dir(out: Path, hf_dir: Path, state: dict[str, np.ndarray]) -> Path:
    """A Hugging Face directory holding ``state`` (dequantized weights) with ``hf_dir``'s
    config and tokenizer files: what the GGUF must load as."""
    out.mkdir(parents=True)
    for f in hf_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
              str(out / "model.safetensors"))
    return out


# ---- vocabularies -------------------------------------------------------------------------
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def byte_level_vocab(tokenizer_dir: Path, pre: str = "gpt-2") -> dict[str, Any]:
    """GGUF metadata of a byte-level tokenizer.json (+ tokenizer_config.json)."""
    raw = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    ids = dict(raw["model"]["vocab"])
    types = {}
    for added in raw["added_tokens"]:
        ids[added["content"]] = added["id"]
        types[added["id"]] = CONTROL if added["special"] else USER_DEFINED
    tokens = [t for t, _ in sorted(ids.items(), key=lambda kv: kv[1])]
    assert len(tokens) == max(ids.values()) + 1, "ids must be dense"
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw["model"]["merges"]]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [types.get(i, NORMAL) for i in range(len(tokens))],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": ids[config["bos_token"]],
        "tokenizer.ggml.eos_token_id": ids[config["eos_token"]],
        "tokenizer.ggml.add_bos_token": raw["post_processor"] is not None}
    if "chat_template" in config:
        meta["tokenizer.chat_template"] = config["chat_template"]
    return meta


def sentencepiece_vocab(model_file: Path, user_defined: tuple[str, ...] = ()) -> dict[str, Any]:
    """GGUF metadata of a sentencepiece model, as llama.cpp's converter writes it."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]

    def kind(i: int) -> int:
        if sp.is_unknown(i):
            return UNKNOWN
        if sp.is_control(i):
            return CONTROL
        if sp.is_byte(i):
            return BYTE
        if sp.is_unused(i):
            return UNUSED
        return USER_DEFINED if tokens[i] in user_defined else NORMAL

    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [float(sp.get_score(i)) for i in range(n)],
            "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
            "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id(),
            "tokenizer.ggml.add_bos_token": True}
