"""Hugging Face LLaMA-family model directories (Llama, Mistral, Qwen2), read as dense models.

This project's own ITT checkpoints keep their format (``loader.py``); a directory whose
``config.json`` names a Hugging Face architecture is read through this adapter instead:

- ``config_from_hf``: its config becomes a ``ModelConfig`` with no ITT layers (a dense
  ITT layer computes x + Δ(x), which is exactly a LLaMA block);
- ``weight_files`` / ``itt_name``: where each tensor is (one file or index-named shards),
  and the name ``ITTModel.state_dict()`` gives it;
- ``read_generation_config``: ``generation_config.json``'s end-of-sequence ids and sampling
  defaults.

Whatever a checkpoint asks for that the model cannot compute exactly (another architecture,
activation, RoPE scaling, sliding-window attention over the served context) is refused with a
``CheckpointError`` naming the file and the field, never approximated.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from itt_runtime.config import (
    CheckpointError,
    ConfigError,
    ModelConfig,
    RopeScaling,
    read_json_object,
)
from itt_runtime.sampling_params import ParamError, SamplingParams

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_FILE = "generation_config.json"

# generation_config.json field -> SamplingParams field: the defaults vLLM takes from it
# (``--generation-config auto``) for fields a request leaves unset.
GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                       "min_p": "min_p", "repetition_penalty": "repetition_penalty"}


def is_hf_config(raw: object) -> bool:
    """A config.json from Hugging Face (not this project's ``"model_type": "itt"``)."""
    return isinstance(raw, dict) and raw.get("model_type") != "itt" and "architectures" in raw


def is_hf_dir(path: Path) -> bool:
    """Whether directory ``path`` holds a Hugging Face checkpoint (its tensor names need
    ``itt_name``); False for this project's format or an unreadable config."""
    try:
        return is_hf_config(json.loads((path / "config.json").read_text()))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False


def read_json(file: Path) -> dict:
    return read_json_object(file, CheckpointError)


# ---- config -------------------------------------------------------------------------------
def config_from_hf(raw: dict, file: Path,
                   generation_eos: tuple[int, ...] = ()) -> ModelConfig:
    """config.json of a Llama/Mistral/Qwen2 checkpoint -> a dense ``ModelConfig``.
    ``generation_eos``: generation_config.json's eos ids, which also end generation."""
    def fail(msg: str) -> NoReturn:
        raise CheckpointError(f"{file}: {msg}")

    archs = raw.get("architectures")
    if not (isinstance(archs, list) and len(archs) == 1 and archs[0] in ARCHITECTURES):
        fail(f"architecture {archs!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    arch = archs[0]

    def get(name: str, default=None, kind: type | tuple = int):
        v = raw.get(name, default)
        if v is None and default is None:
            fail(f"'{name}' is required")
        ok = isinstance(v, kind) and not isinstance(v, bool) if kind is not bool \
            else isinstance(v, bool)
        if not ok:
            what = "true or false" if kind is bool else "an integer" if kind is int \
                else "a number"
            fail(f"'{name}' must be {what}, got {v!r}")
        return v

    if raw.get("hidden_act", "silu") != "silu":
        fail(f"'hidden_act' {raw['hidden_act']!r} is not supported (only silu)")
    if raw.get("mlp_bias", False):
        fail("'mlp_bias' true is not supported")
    d_model, n_heads = get("hidden_size"), get("num_attention_heads")
    head_dim = raw.get("head_dim")
    if head_dim is not None and (not isinstance(head_dim, int) or head_dim <= 0):
        fail(f"'head_dim' must be a positive integer, got {head_dim!r}")
    if head_dim == d_model // n_heads and d_model % n_heads == 0:
        head_dim = None                                  # the derived value: nothing to record
    max_pos = get("max_position_embeddings", 2048)
    theta, scaling = _rope(raw, fail)
    window = _sliding_window(raw, arch, fail)
    eos = raw.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else []
    if eos is not None and not all(isinstance(i, int) and not isinstance(i, bool)
                                   for i in eos_ids):
        fail(f"'eos_token_id' must be an integer or a list of integers, got {eos!r}")
    bos = raw.get("bos_token_id")
    extra_eos = tuple(dict.fromkeys(i for i in [*eos_ids[1:], *generation_eos]
                                    if not eos_ids or i != eos_ids[0]))
    dtype = raw.get("torch_dtype", raw.get("dtype"))
    try:
        return ModelConfig(
            vocab_size=get("vocab_size"), d_model=d_model, n_layers=get("num_hidden_layers"),
            n_heads=n_heads, n_kv_heads=get("num_key_value_heads", n_heads),
            ffn_dim=get("intermediate_size"), rope_theta=theta,
            norm_eps=get("rms_norm_eps", 1e-6, (int, float)), max_position_embeddings=max_pos,
            tie_embeddings=get("tie_word_embeddings", False, bool),
            bos_token_id=bos if isinstance(bos, int) else -1,
            eos_token_id=eos_ids[0] if eos_ids else -1, extra_eos_token_ids=extra_eos,
            head_dim_override=head_dim,
            qkv_bias=arch == "Qwen2ForCausalLM",
            o_bias=arch == "LlamaForCausalLM" and get("attention_bias", False, bool),
            rope_scaling=scaling,
            sliding_window=window if window is not None and window < max_pos else None,
            torch_dtype=dtype if isinstance(dtype, str) else None)
    except ConfigError as e:
        fail(str(e).removeprefix("config.json: "))


def _rope(raw: dict, fail: Callable[[str], NoReturn]) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from ``rope_theta`` + ``rope_scaling`` (the hub's files) or
    ``rope_parameters`` (what transformers 5 writes)."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        fail(f"'rope_scaling' must be an object or null, got {params!r}")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        fail(f"'rope_theta' must be a positive number, got {theta!r}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        fail("'partial_rotary_factor' other than 1 is not supported")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind not in ("linear", "llama3"):
        fail(f"'rope_scaling' type {kind!r} is not supported (supported: linear, llama3)")
    factor = params.get("factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool):
        fail(f"'rope_scaling' {kind} needs a numeric 'factor', got {factor!r}")
    if kind == "linear":
        return float(theta), RopeScaling("linear", float(factor))
    return float(theta), RopeScaling(
        "llama3", float(factor), params.get("low_freq_factor"), params.get("high_freq_factor"),
        params.get("original_max_position_embeddings"))


def _sliding_window(raw: dict, arch: str, fail: Callable[[str], NoReturn]) -> int | None:
    """The attention window when the checkpoint uses one (Mistral: ``sliding_window`` set;
    Qwen2: ``use_sliding_window`` or a sliding layer). The model computes full attention,
    which is the same thing while the context fits in the window, so the engine serves at
    most that many positions (``ModelConfig.sliding_window``)."""
    window = raw.get("sliding_window")
    if arch == "LlamaForCausalLM":
        return None
    if arch == "Qwen2ForCausalLM":
        sliding_layers = "sliding_attention" in (raw.get("layer_types") or [])
        if not (raw.get("use_sliding_window", False) or sliding_layers):
            return None
    if window is None:
        return None
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        fail(f"'sliding_window' must be a positive integer or null, got {window!r}")
    return window


# ---- weights ------------------------------------------------------------------------------
_TOP = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight"}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_IN_LAYER = {"input_layernorm.weight": "attn_norm.weight",
             "post_attention_layernorm.weight": "mlp_norm.weight",
             **{f"self_attn.{p}_proj.{w}": f"{p}_proj.{w}"
                for p in "qkvo" for w in ("weight", "bias")},
             **{f"mlp.{p}_proj.weight": f"{p}_proj.weight" for p in ("gate", "up", "down")}}


def itt_name(hf_name: str, cfg: ModelConfig) -> str | None:
    """The ``ITTModel.state_dict()`` key of a checkpoint tensor; None for one the model does
    not use (RoPE tables some old checkpoints saved; ``lm_head`` of a tied model, which
    transformers ignores too). A name that maps to nothing is returned as is, so that the
    caller reports it as an unknown tensor."""
    if hf_name.endswith("rotary_emb.inv_freq") or (hf_name == "lm_head.weight"
                                                    and cfg.tie_embeddings):
        return None
    if hf_name in _TOP:
        return _TOP[hf_name]
    m = _LAYER.fullmatch(hf_name)
    if m and m.group(2) in _IN_LAYER:
        return f"layers.{int(m.group(1))}.block.{_IN_LAYER[m.group(2)]}"
    return hf_name


def to_hf_name(key: str) -> str | None:
    """The checkpoint name of ``ITTModel.state_dict()`` key ``key`` (the tables above,
    inverted); None for a tensor a Llama checkpoint does not have (φ, routers, fused
    projections)."""
    for theirs, ours in _TOP.items():
        if key == ours:
            return theirs
    m = re.fullmatch(r"layers\.(\d+)\.block\.(.+)", key)
    if m:
        for theirs, ours in _IN_LAYER.items():
            if m.group(2) == ours:
                return f"model.layers.{m.group(1)}.{theirs}"
    return None


def hf_name(key: str) -> str:
    """The checkpoint name of ``ITTModel.state_dict()`` key ``key``, for messages."""
    return to_hf_name(key) or key


def weight_files(path: Path) -> dict[str, Path] | None:
    """``{tensor name: shard}`` from ``model.safetensors.index.json``; None when the weights
    are one ``model.safetensors``. Every shard the index names must exist."""
    index = path / INDEX_FILE
    if not index.is_file():
        if (path / SINGLE_FILE).is_file():
            return None
        raise CheckpointError(f"model directory {str(path)!r} has neither {SINGLE_FILE} nor "
                              f"{INDEX_FILE}")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names")
    for shard in sorted(set(weight_map.values())):
        if "/" in shard or shard.startswith(".") or not (path / shard).is_file():
            raise CheckpointError(f"{index}: shard {shard!r} is missing from {path}")
    return {k: path / v for k, v in weight_map.items()}


# ---- generation_config.json ---------------------------------------------------------------
@dataclass(frozen=True)
class GenerationConfig:
    """What a model's ``generation_config.json`` says about serving it."""
    eos_token_ids: tuple[int, ...] = ()
    sampling_defaults: dict = field(default_factory=dict)   # SamplingParams field -> value


def read_generation_config(path: Path) -> GenerationConfig:
    """``generation_config.json`` in directory ``path`` (an empty one if there is none).
    Values a request could not use are refused here, naming the field, rather than failing
    every request that relies on them."""
    file = path / GENERATION_FILE
    if not file.is_file():
        return GenerationConfig()
    raw = read_json(file)
    eos = raw.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos or []
    if not isinstance(eos_ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos_ids):
        raise CheckpointError(f"{file}: 'eos_token_id' must be a token id or a list of them, "
                              f"got {eos!r}")
    defaults = {ours: raw[theirs] for theirs, ours in GENERATION_DEFAULTS.items()
                if raw.get(theirs) is not None}
    if defaults.get("top_k") == 0:              # transformers' "no top-k" is 0; ours is -1
        defaults["top_k"] = -1
    try:
        SamplingParams(**defaults)
    except ParamError as e:
        raise CheckpointError(f"{file}: {e.message}") from None
    if any(isinstance(v, float) and not math.isfinite(v) for v in defaults.values()):
        raise CheckpointError(f"{file}: sampling defaults must be finite")
    return GenerationConfig(tuple(eos_ids), defaults)
