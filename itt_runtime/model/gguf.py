"""GGUF files (llama.cpp's single-file checkpoints), read as dense models.

A ``.gguf`` holds the hyper-parameters and the vocabulary as metadata and every tensor in one
of ggml's block formats (F32, F16, BF16, Q8_0, Q4_K …). This adapter turns one into what the
rest of the project already serves: the ``ModelConfig`` that the equivalent Hugging Face
directory gives (``hf.config_from_hf``), the model's state-dict names, and fp32 tensors.

- Read with the format's own library, ``gguf`` (``GGUFReader``): the file is memory-mapped and
  nothing is copied until a tensor is asked for. The reader makes a few array views per
  metadata array element (every vocabulary entry and merge), and ``np.memmap``'s view hooks
  dominate that: ``_Reader`` hands it a plain ndarray view of the same mapping, which opens
  SmolLM2's file (49k tokens, 49k merges) in 2.1 s instead of 5.4 s on a 2-core CPU. Still, a
  load opens the file once (``GGUFCheckpoint``) and takes config, vocabulary and tensors
  from it.
- Tensors are dequantized one at a time with ``gguf.quants.dequantize`` into fp32 (exact: every
  block format is a scale times small integers, representable in fp32), then converted to the
  model's dtype. Whether each tensor *type* dequantizes is probed on one zero block before any
  tensor is read, so that a file with a type this ``gguf`` cannot dequantize is refused up front,
  naming the tensor and its type, never half-loaded.
- llama.cpp's converter reorders the rows of each attention head of Q and K (weights and biases)
  for llama-architecture models, from the "rotate half" RoPE layout of Hugging Face checkpoints
  to interleaved pairs (its "normal" RoPE); ``unpermute_rope`` undoes that, since our layers rotate
  halves. qwen2 files use llama.cpp's NeoX RoPE, which is the rotate-half layout: no reordering.
- GGUF lists a tensor's dimensions fastest-varying first (``[in, out]`` for a linear weight):
  shapes are compared reversed.
- The names map through Hugging Face's (``_HF_NAME``) and then ``hf.itt_name``, so that the one
  name table of ``hf.py`` stays the only place that knows ours.
- As for Hugging Face directories, what the model cannot compute exactly is refused with a
  ``CheckpointError`` naming the file and the metadata key or tensor: other architectures,
  mixture-of-experts, RoPE scaling other than linear and Llama 3's (which llama.cpp stores as
  per-frequency divisors, ``rope_freqs.weight``: recognised when they are Llama 3.1's
  formula), partial rotary, a non-default attention scale, logit or embedding scales.
- End of generation follows llama.cpp, which the file was made for: the EOS, EOT and EOM ids,
  plus the end-of-turn tokens it recognises by their text (``<|im_end|>``, ``<|eot_id|>``,
  ``<|endoftext|>`` …), since a GGUF has no generation_config.json to list them. This is the
  one intended difference from the config of the Hugging Face directory transformers writes
  from the same file (extra EOS ids).
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor

from itt_runtime.config import CheckpointError, ConfigError, ModelConfig, RopeScaling
from itt_runtime.model import hf
from itt_runtime.model.layers import rope_inv_freq
from itt_runtime.sampling_params import ParamError, SamplingParams

ARCHITECTURES = ("llama", "qwen2")
_GGUF_VERSION = importlib.metadata.version("gguf")
MAGIC = b"GGUF"
ROWS = "the row count of 'token_embd.weight'"          # the vocabulary size, for messages

# GGUF tensor name -> Hugging Face name (per layer: the part after "blk.N.").
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_IN_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}

_TOP_FROM_HF = {h: g for g, h in _TOP.items()}
_IN_LAYER_FROM_HF = {h: g for g, h in _IN_LAYER.items()}

# llama.cpp's end-of-generation tokens, recognised by their text (llama-vocab.cpp).
EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
             "<|eom_id|>", "<EOT>", "<|end_of_text|>")

# general.sampling.* -> SamplingParams field (what a request leaves unset). Repetition
# penalties are left out: llama.cpp's applies to the last N tokens, not to the whole text.
SAMPLING_DEFAULTS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
                     "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p"}

# Metadata that changes what a llama/qwen2 model computes, with the value that changes nothing.
_NEUTRAL = {"expert_count": 0, "expert_used_count": 0, "logit_scale": 1.0,
            "embedding_scale": 1.0, "residual_scale": 1.0, "attn_logit_softcapping": 0.0,
            "final_logit_softcapping": 0.0, "attention.clamp_kqv": 0.0,
            "use_parallel_residual": False, "attention.causal": True}


def is_gguf(path: Path) -> bool:
    """Whether ``path`` names a GGUF file: a ``.gguf`` name (even if missing, so that the
    error says so) or a file that starts with the GGUF magic."""
    if path.suffix.lower() == ".gguf":
        return not path.is_dir()
    try:
        with path.open("rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


class UnknownTensorType(ValueError):
    """A tensor's ggml type id is one the installed ``gguf`` does not know."""


class _Reader(GGUFReader):
    """``GGUFReader`` reading through a plain ndarray view of its ``np.memmap`` (same bytes,
    same mapping; see the module docstring): the reader assigns ``self.data`` once. It also
    names the tensor whose type id is unknown (the reader's own error names only the id)."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        for field in fields:
            try:
                name, raw = str(bytes(field.parts[1]), "utf-8"), int(field.parts[4][0])
            except (IndexError, TypeError, ValueError):
                break                    # another layout of the reader's fields: let it check
            if raw not in GGMLQuantizationType._value2member_map_:
                raise UnknownTensorType(f"tensor {name!r} has ggml type {raw}, which gguf "
                                        f"{_GGUF_VERSION} does not know")
        super()._build_tensors(start_offs, fields)

    @property                                                   # type: ignore[override]
    def data(self) -> np.ndarray:
        return self.__dict__["_mapped"]

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self.__dict__["_mapped"] = value.view(np.ndarray)


@dataclass
class GGUFCheckpoint:
    """One opened GGUF file: its metadata as Python values and its tensors by GGUF name
    (memory-mapped: nothing is read until a tensor is dequantized)."""
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, ReaderTensor]

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture"))

    def fail(self, msg: str) -> NoReturn:
        raise CheckpointError(f"{self.path}: {msg}")


def open_gguf(path: Path) -> GGUFCheckpoint:
    """Open and check the framing of a GGUF file; one clear ``CheckpointError`` for a missing,
    truncated or foreign file (the reader's own errors are bare ValueErrors)."""
    if not path.is_file():
        raise CheckpointError(f"model file {str(path)!r} does not exist")
    try:
        reader = _Reader(path, "r")
    except UnknownTensorType as e:
        raise CheckpointError(f"{path}: {e}") from None
    except ValueError as e:
        what = "not a GGUF file" if "magic" in str(e) else "not a readable GGUF file " \
            "(truncated or corrupt?)"
        raise CheckpointError(f"{path}: {what}: {e}") from None
    except (OSError, IndexError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file: {e}") from None
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            metadata[key] = field.contents()
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: metadata {key!r} is unreadable ({e})") from None
    return GGUFCheckpoint(path, metadata, {t.name: t for t in reader.tensors})


# ---- config -------------------------------------------------------------------------------
def config_from_gguf(ck: GGUFCheckpoint) -> ModelConfig:
    """The file's architecture and hyper-parameters -> a dense ``ModelConfig`` (the one the
    Hugging Face directory converted from this file gives, with llama.cpp's end-of-generation
    tokens added)."""
    arch, meta, fail = ck.arch, ck.metadata, ck.fail
    if arch not in ARCHITECTURES:
        fail(f"architecture {meta.get('general.architecture')!r} is not supported "
             f"(supported: {', '.join(ARCHITECTURES)})")

    def get(key: str, default: Any = ..., kind: type | tuple = int) -> Any:
        name = f"{arch}.{key}"
        v = meta.get(name, default)
        if v is ...:
            fail(f"metadata '{name}' is required")
        if isinstance(v, list) and kind is int and v and all(x == v[0] for x in v):
            v = v[0]                          # a per-layer array with one value throughout
        ok = isinstance(v, kind) and (kind is bool or not isinstance(v, bool))
        if not ok and v is not None:
            what = {int: "an integer", str: "a string"}.get(kind, "a number")  # type: ignore
            fail(f"metadata '{name}' must be {what} (the same for every layer), got {v!r}")
        return v

    for key, neutral in _NEUTRAL.items():
        value = meta.get(f"{arch}.{key}", neutral)
        if value != neutral:
            fail(f"metadata '{arch}.{key}' = {value!r} is not supported")
    d_model, n_heads = get("embedding_length"), get("attention.head_count")
    n_kv_heads = get("attention.head_count_kv", n_heads)
    head_dim = get("attention.key_length", None) or (d_model // n_heads if n_heads else 0)
    if get("attention.value_length", head_dim) != head_dim:
        fail(f"metadata '{arch}.attention.value_length' differs from the key length {head_dim}")
    if get("rope.dimension_count", head_dim) != head_dim:
        fail(f"metadata '{arch}.rope.dimension_count' = {meta[f'{arch}.rope.dimension_count']} "
             f"(partial rotary) is not supported; heads have {head_dim} dimensions")
    scale = get("attention.scale", None, (int, float))
    if scale is not None and head_dim and not math.isclose(scale, head_dim ** -0.5,
                                                           rel_tol=1e-6):
        fail(f"metadata '{arch}.attention.scale' = {scale} is not 1/sqrt(head_dim)")
    embed = ck.tensors.get("token_embd.weight")
    if embed is None:
        fail("is missing tensor 'token_embd.weight'")
    vocab_size = int(embed.shape[-1])
    if get("vocab_size", vocab_size) != vocab_size:
        fail(f"metadata '{arch}.vocab_size' = {meta[f'{arch}.vocab_size']} but "
             f"'token_embd.weight' has {vocab_size} rows")
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) > vocab_size:
        fail(f"the vocabulary has {len(tokens)} tokens but 'token_embd.weight' has "
             f"{vocab_size} rows")
    eos, extra_eos = _end_of_generation(meta, fail)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    biased = "blk.0.attn_q.bias" in ck.tensors
    window = get("attention.sliding_window", None)
    max_pos = get("context_length")
    theta = decimal(get("rope.freq_base", 10000.0, (int, float)))
    scaling = _rope_scaling(ck, get)
    if "rope_freqs.weight" in ck.tensors:
        scaling = _llama3_scaling(ck, get, head_dim, theta)
    try:
        return ModelConfig(
            vocab_size=vocab_size, d_model=d_model, n_layers=get("block_count"),
            n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=get("feed_forward_length"),
            rope_theta=theta,
            norm_eps=decimal(get("attention.layer_norm_rms_epsilon", kind=(int, float))),
            max_position_embeddings=max_pos,
            tie_embeddings="output.weight" not in ck.tensors,
            bos_token_id=bos if isinstance(bos, int) else -1, eos_token_id=eos,
            extra_eos_token_ids=extra_eos,
            head_dim_override=None if head_dim * n_heads == d_model else head_dim,
            qkv_bias=arch == "qwen2", o_bias=arch == "llama" and biased,
            rope_scaling=scaling,
            sliding_window=window if isinstance(window, int) and window < max_pos else None)
    except ConfigError as e:
        fail(str(e).removeprefix("config.json: "))


def _rope_scaling(ck: GGUFCheckpoint, get: Callable[..., Any]) -> RopeScaling | None:
    kind = get("rope.scaling.type", None, str)
    factor = get("rope.scaling.factor", None, (int, float))
    old_linear = get("rope.scale_linear", None, (int, float))      # files before scaling.type
    if kind in (None, "none") and old_linear not in (None, 1.0):
        return RopeScaling("linear", decimal(old_linear))
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind != "linear":
        ck.fail(f"metadata '{ck.arch}.rope.scaling.type' = {kind!r} is not supported "
                "(supported: none, linear)")
    return RopeScaling("linear", decimal(factor))


def _llama3_scaling(ck: GGUFCheckpoint, get: Callable[..., Any], head_dim: int,
                    theta: float) -> RopeScaling:
    """Llama 3.1/3.2's RoPE scaling from ``rope_freqs.weight``: llama.cpp's converter stores
    the divisor of each frequency instead of the parameters. They are taken to be Llama 3's
    (low_freq_factor 1, high_freq_factor 4, original context
    ``rope.scaling.original_context_length`` or 8192, factor the largest divisor) and
    accepted only if they give these divisors (fp32 rounding apart); anything else is
    refused, since the model computes RoPE from parameters."""
    t = ck.tensors["rope_freqs.weight"]
    if t.tensor_type != GGMLQuantizationType.F32 or int(t.n_elements) != head_dim // 2:
        ck.fail(f"tensor 'rope_freqs.weight' must be {head_dim // 2} F32 values, got "
                f"{int(t.n_elements)} {t.tensor_type.name}")
    divisors = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1))
    original = get("rope.scaling.original_context_length", 8192)
    guess = RopeScaling("llama3", decimal(float(divisors.max())), 1.0, 4.0, original)
    want = rope_inv_freq(head_dim, theta) / divisors
    if not torch.allclose(rope_inv_freq(head_dim, theta, guess), want, rtol=1e-5, atol=0):
        ck.fail("tensor 'rope_freqs.weight' (per-frequency RoPE factors) is not Llama 3's "
                f"scaling with factor {guess.factor}, low_freq_factor 1, high_freq_factor 4 "
                f"and original context {original}; other factors are not supported")
    return guess


def decimal(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not
    9.999999747378752e-06): the value the checkpoint's authors wrote, and in fp32 the same."""
    return float(str(np.float32(value)))


def _end_of_generation(meta: dict[str, Any], fail: Callable[[str], NoReturn]) \
        -> tuple[int, tuple[int, ...]]:
    """(EOS id or -1, the other ids that end generation), as llama.cpp decides them."""
    def token_id(key: str) -> int | None:
        v = meta.get(f"tokenizer.ggml.{key}")
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            fail(f"metadata 'tokenizer.ggml.{key}' must be a token id, got {v!r}")
        return v

    eos = token_id("eos_token_id")
    others = [token_id(k) for k in ("eot_token_id", "eom_token_id")]
    tokens = meta.get("tokenizer.ggml.tokens") or []
    others += [i for i, t in enumerate(tokens) if t in EOG_TEXTS]
    extra = tuple(dict.fromkeys(i for i in others if i is not None and i != eos))
    return (eos if eos is not None else -1), extra


# ---- tensors ------------------------------------------------------------------------------
def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor name; None if it has none."""
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() \
            and parts[2] in _IN_LAYER and parts[3] in ("weight", "bias"):
        return f"model.layers.{int(parts[1])}.{_IN_LAYER[parts[2]]}.{parts[3]}"
    return None


def to_gguf_name(key: str) -> str:
    """The GGUF name of ``ITTModel.state_dict()`` key ``key`` (for messages)."""
    theirs = hf.to_hf_name(key) or key
    if theirs in _TOP_FROM_HF:
        return _TOP_FROM_HF[theirs]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", theirs)
    if m and m.group(2) in _IN_LAYER_FROM_HF:
        return f"blk.{m.group(1)}.{_IN_LAYER_FROM_HF[m.group(2)]}.{m.group(3)}"
    return key


@functools.cache
def dequantizable(qtype: GGMLQuantizationType) -> bool:
    """Whether the installed ``gguf`` dequantizes this type (tried on one zero block)."""
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16,
                 GGMLQuantizationType.F64):
        return True
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    try:
        gguf.quants.dequantize(np.zeros((1, block_bytes), np.uint8), qtype)
    except (NotImplementedError, ValueError, KeyError):
        return False
    return True


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: within each head, row 2i+j (pair i, member j) goes
    back to row j·(head_dim/2)+i, the rotate-half layout. ``w``: (n_heads·head_dim, …)."""
    rest = w.shape[1:]
    return w.reshape(n_heads, -1, 2, *rest).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class GGUFTensor:
    """Where one model tensor is in the file, and how to read it."""
    name: str                              # GGUF name
    tensor: ReaderTensor
    rope_heads: int | None                 # heads to un-permute (llama Q/K), else None

    @property
    def type_name(self) -> str:
        return self.tensor.tensor_type.name

    def read(self) -> torch.Tensor:
        """The tensor as fp32 (a fresh array: never a view of the file)."""
        t = self.tensor
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16,
                             GGMLQuantizationType.F64):
            values = np.array(t.data, dtype=np.float32)            # a copy, off the mapping
        else:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        values = values.reshape(tuple(int(d) for d in reversed(t.shape)))
        if self.rope_heads is not None:
            values = unpermute_rope(values, self.rope_heads)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def locate_tensors(ck: GGUFCheckpoint, cfg: ModelConfig,
                   expected: dict[str, tuple[int, ...]]) -> dict[str, GGUFTensor]:
    """``{state_dict key: GGUFTensor}`` for every tensor the model needs, after checking names,
    shapes and types against ``expected`` (the model's shapes): nothing is read yet."""
    found: dict[str, GGUFTensor] = {}
    unknown = []
    for name, t in ck.tensors.items():
        if name == "rope_freqs.weight":
            continue                            # read into the config (_llama3_scaling)
        theirs = hf_name(name)
        key = hf.itt_name(theirs, cfg) if theirs else name
        if key is None:
            continue                            # lm_head of a tied model: not used
        if key not in expected:
            unknown.append(name)
            continue
        heads = None
        if ck.arch == "llama" and name.split(".")[2:3] in (["attn_q"], ["attn_k"]):
            heads = cfg.n_heads if ".attn_q." in name else cfg.n_kv_heads
        found[key] = GGUFTensor(name, t, heads)
    if unknown:
        ck.fail(f"has unknown tensor(s) {unknown[:5]}{' …' if len(unknown) > 5 else ''} "
                "for this config")
    missing = sorted(set(expected) - set(found))
    if missing:
        names = [to_gguf_name(k) for k in missing]
        ck.fail(f"is missing tensor(s) {names[:5]}{' …' if len(names) > 5 else ''}")
    for key, g in sorted(found.items()):
        shape = tuple(int(d) for d in reversed(g.tensor.shape))
        if shape != expected[key]:
            ck.fail(f"tensor {g.name!r} has shape {list(shape)}, the metadata implies "
                    f"{list(expected[key])}")
        if not dequantizable(g.tensor.tensor_type):
            ck.fail(f"tensor {g.name!r} has type {g.type_name}, which cannot be dequantized "
                    f"(gguf {_GGUF_VERSION} dequantizes F32, F16, BF16, Q4_0 … Q8_0, the "
                    "K-quants Q2_K … Q6_K and the IQ types)")
    return found


# ---- generation defaults ------------------------------------------------------------------
def generation_config(ck: GGUFCheckpoint, cfg: ModelConfig) -> hf.GenerationConfig:
    """End-of-generation ids and the sampling defaults the file states
    (``general.sampling.*``), as a Hugging Face directory's generation_config.json gives
    them."""
    defaults = {ours: ck.metadata[key] for key, ours in SAMPLING_DEFAULTS.items()
                if key in ck.metadata}
    if defaults.get("top_k") == 0:                   # llama.cpp's "no top-k" is 0; ours is -1
        defaults["top_k"] = -1
    try:
        SamplingParams(**defaults)
    except (ParamError, TypeError) as e:
        ck.fail(f"sampling metadata is not usable: {getattr(e, 'message', e)}")
    return hf.GenerationConfig(cfg.eos_token_ids, defaults)
