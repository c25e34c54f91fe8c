"""Checkpoint format (ITT_SPEC): a directory with config.json, model.safetensors, tokenizer.model.

A Hugging Face LLaMA-family directory (config.json naming an architecture, weights in one file
or in shards) is read too, through the adapter in ``hf.py``, as a dense model.

``load_model`` checks everything before torch sees it, so that a bad directory fails with a
``CheckpointError`` naming the problem rather than a stack trace from deep inside torch. The
model is built on the meta device and its parameters materialised one tensor at a time from
memory-mapped safetensors, so that loading holds at most one extra copy of one tensor.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from itt_runtime.checkpoints import resolve_model_path
from itt_runtime.config import CheckpointError, ConfigError, ModelConfig, read_json_object
from itt_runtime.model import hf
from itt_runtime.model.itt import ITTModel
from itt_runtime.model.layers import Rotary, input_major_view
from itt_runtime.tokenizers.loader import TOKENIZER_FILES, load_tokenizer
from itt_runtime.tokenizers.plain_chat import plain_tokenizer_config
from itt_runtime.tokenizers.tokenizer import Tokenizer

FILES = ("config.json", "model.safetensors", "tokenizer.model")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def load_config(path: str | Path | None) -> ModelConfig:
    path = resolve_model_path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} does not exist")
    missing = [f for f in FILES if f not in ("tokenizer.model", "model.safetensors")
               and not (path / f).is_file()]
    if not any((path / f).is_file() for f in (hf.SINGLE_FILE, hf.INDEX_FILE)):
        missing.append(f"{hf.SINGLE_FILE} (or {hf.INDEX_FILE} and its shards)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    if missing:
        raise CheckpointError(f"model directory {str(path)!r} is missing {', '.join(missing)}")
    raw = read_json_object(path / "config.json", CheckpointError)
    if hf.is_hf_config(raw):
        generation = hf.read_generation_config(path)
        return hf.config_from_hf(raw, path / "config.json", generation.eos_token_ids)
    try:
        return ModelConfig.from_dict(raw)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


# The most positions a config may ask for: the RoPE tables are allocated for all of them.
MAX_POSITIONS = 1 << 20


def read_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of a safetensors file, from its header only."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                    for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None


def check_size(cfg: ModelConfig, headers: dict[Path, dict], path: Path) -> None:
    """Refuse a config that implies far more weights than the files hold (more than twice:
    anything closer gets the exact per-tensor message), before anything of that size is
    built, even on the meta device. The embedding and the MLPs alone are a lower bound."""
    held = sum(math.prod(shape) for h in headers.values() for shape, _ in h.values())
    implied = cfg.vocab_size * cfg.d_model + cfg.n_layers * 3 * cfg.d_model * cfg.ffn_dim
    if implied > 2 * held:
        raise CheckpointError(f"{path / 'config.json'} implies at least {implied:,} "
                              f"parameters but {', '.join(f.name for f in headers)} "
                              f"hold{'s' if len(headers) == 1 else ''} {held:,}")
    if cfg.max_position_embeddings > MAX_POSITIONS:
        raise CheckpointError(f"'max_position_embeddings' {cfg.max_position_embeddings} is "
                              f"more than {MAX_POSITIONS} positions")


@contextmanager
def _meta_device() -> Iterator[None]:
    """Build modules on the meta device (shapes, no memory) without their random init: the
    loader replaces every weight, and initialising on meta loads torch's meta kernels, which
    takes seconds."""
    saved = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Embedding)}
    try:
        for cls in saved:
            cls.reset_parameters = lambda self: None           # type: ignore[method-assign]
        with torch.device("meta"):
            yield
    finally:
        for cls, reset in saved.items():
            cls.reset_parameters = reset                        # type: ignore[method-assign]


def meta_model(cfg: ModelConfig) -> ITTModel:
    """The model on the meta device: every tensor's shape, no memory, no init."""
    with _meta_device():
        return ITTModel(cfg)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The model's tensor shapes, from a model built on the meta device (no memory)."""
    return {k: tuple(v.shape) for k, v in meta_model(cfg).state_dict().items()}


def _listed(names: list[str]) -> str:
    return f"{names[:5]}{' …' if len(names) > 5 else ''}"


def locate_weights(path: Path, cfg: ModelConfig) -> dict[str, tuple[Path, str]]:
    """``{state_dict key: (file, name in the file)}`` for every tensor the model needs, after
    checking names, shapes and dtypes against the files' headers (nothing is read yet)."""
    shard_of = hf.weight_files(path)
    files = sorted(set(shard_of.values())) if shard_of else [path / hf.SINGLE_FILE]
    headers = {f: read_header(f) for f in files}
    if shard_of:
        index = path / hf.INDEX_FILE
        for name, file in sorted(shard_of.items()):
            if name not in headers[file]:
                raise CheckpointError(f"{index}: names tensor {name!r} in {file.name}, which "
                                      "does not hold it")
    check_size(cfg, headers, path)
    convert = hf.is_hf_dir(path)                    # Hugging Face names, mapped to ours
    found: dict[str, tuple[Path, str]] = {}
    for file, header in headers.items():
        for name in header:
            if shard_of is not None and shard_of.get(name) != file:
                continue                   # a copy the index does not point at: not used
            key = hf.itt_name(name, cfg) if convert else name
            if key is not None:
                found[key] = (file, name)
    expected = expected_shapes(cfg)
    where = ", ".join(f.name for f in files)
    unknown = sorted(set(found) - set(expected))
    missing = sorted(set(expected) - set(found))
    if unknown:
        raise CheckpointError(f"{where} has unknown tensor(s) "
                              f"{_listed([found[k][1] for k in unknown])} for this config")
    if missing:
        names = [hf.hf_name(k) if convert else k for k in missing]
        raise CheckpointError(f"{where} is missing tensor(s) {_listed(names)}")
    for key, (file, name) in sorted(found.items()):
        shape, file_dtype = headers[file][name]
        if shape != expected[key]:
            raise CheckpointError(f"{file.name}: tensor {name!r} has shape {list(shape)}, "
                                  f"config.json implies {list(expected[key])}")
        if file_dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{file.name}: tensor {name!r} is {file_dtype}, not finite "
                                  "floating point")
    return found


def all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """``isfinite(t).all()``, fast: a NaN or an infinity makes the sum non-finite, so a finite
    sum settles it in one pass (36x faster than the mask on bf16); only a non-finite sum
    (a bad tensor, or finite values that overflow when added) takes the exact check, in
    slices, so that it never holds a mask the size of a whole embedding."""
    if bool(torch.isfinite(t.sum())):
        return True
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all())
               for i in range(0, flat.numel(), chunk))


def set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """Replace the (meta) parameter or buffer ``key`` of ``model`` by ``value``."""
    owner_name, _, leaf = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=value.is_floating_point())
    else:
        owner._buffers[leaf] = value


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32,
               fuse: bool = False) -> tuple[ITTModel, Tokenizer]:
    """Load a model directory (default: the shipped model) or a Hugging Face LLaMA-family
    directory. Returns (model in eval mode, tok). The config is checked against the weight
    files' headers before anything is allocated; then the model is built on the meta device
    and each tensor is read (memory-mapped), converted to ``dtype`` on ``device`` and put in
    place one at a time, largest first, each file mapping closed before the next, so that the
    peak is the model plus one tensor's two copies.
    ``fuse``: for serving, fuse each block's projections once (``Block.fuse_projections``)."""
    path = resolve_model_path(path)
    cfg = load_config(path)
    tok = load_tokenizer(path, cfg)
    weights = locate_weights(path, cfg)
    model = meta_model(cfg)
    device = torch.device(device)
    model.rotary = Rotary(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                          cfg.rope_scaling).to(device=device, dtype=dtype)
    sizes = {k: math.prod(model.get_parameter(k).shape) for k in weights}
    with torch.no_grad():
        for key in sorted(weights, key=lambda k: -sizes[k]):
            file, name = weights[key]
            try:
                # One mapping per tensor: its pages leave the process when it closes.
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    mapped = f.get_tensor(name)
                    value = mapped.to(device=device, dtype=dtype, copy=True)
                    del mapped
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: unreadable ({e})") from None
            if not all_finite(value):
                raise CheckpointError(f"{file.name}: tensor {name!r} is not finite floating "
                                      "point")
            set_tensor(model, key, value)
    model.eval()
    if fuse:
        # On CPU, in fp32, every matmul weight is stored input-major (layers.input_major_view):
        # the LM head too, which for a tied model is the embedding, whose row lookups then
        # read strided memory (about 2 µs a token, against a matmul 1.25x faster every
        # step). Not in bf16: torch's CPU bf16 matmul is 7x slower on that layout.
        input_major = device.type == "cpu" and dtype == torch.float32
        for layer in model.itt_layer_list:
            layer.block.fuse_projections(input_major)
        if input_major:
            head = model.embed_tokens if model.lm_head is None else model.lm_head
            head.weight = nn.Parameter(input_major_view(head.weight), requires_grad=False)
    return model, tok


def save_model(model: ITTModel, tokenizer_file: str | Path, out_dir: str | Path,
               dtype: torch.dtype | None = None) -> Path:
    """Write a complete model directory (config.json, model.safetensors, tokenizer.model,
    tokenizer_config.json). ``dtype`` converts the weights (e.g. bf16 to ship)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    if Path(tokenizer_file).resolve() != (out / "tokenizer.model").resolve():
        shutil.copyfile(tokenizer_file, out / "tokenizer.model")
    # The chat template: the tokenizer's own config where it has one, else this project's
    # plain "User:/Assistant:" format (itt-train's models are trained on plain prose).
    src_config = Path(tokenizer_file).parent / "tokenizer_config.json"
    dst_config = out / "tokenizer_config.json"
    if src_config.is_file():
        if src_config.resolve() != dst_config.resolve():
            shutil.copyfile(src_config, dst_config)
    else:
        dst_config.write_text(json.dumps(plain_tokenizer_config(), indent=2) + "\n")
    return out
