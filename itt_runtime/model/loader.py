"""Checkpoint format (ITT_SPEC): a directory with config.json, model.safetensors, tokenizer.model.

``load_model`` checks everything before torch sees it, so that a bad directory fails with a
``CheckpointError`` naming the problem rather than a stack trace from deep inside torch.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from itt_runtime.config import ConfigError, ModelConfig
from itt_runtime.model.itt import ITTModel
from itt_runtime.tokenizer import Tokenizer

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL_DIR = MODELS_DIR / "default"
SHIPPED_MODELS = ("default", "arith")      # names that load a model shipped in the package
FILES = ("config.json", "model.safetensors", "tokenizer.model")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class CheckpointError(ConfigError):
    """A model directory is missing, incomplete or inconsistent."""


def resolve_model_path(model: str | Path | None) -> Path:
    """``None`` or a shipped model's name (``SHIPPED_MODELS``) -> its directory inside the
    package; anything else is a path."""
    if model is None:
        return DEFAULT_MODEL_DIR
    if str(model) in SHIPPED_MODELS:
        return MODELS_DIR / str(model)
    return Path(model).expanduser()


def load_config(path: str | Path | None) -> ModelConfig:
    path = resolve_model_path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} does not exist")
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"model directory {str(path)!r} is missing {', '.join(missing)}")
    try:
        raw = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    try:
        return ModelConfig.from_dict(raw)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_tokenizer(path: str | Path | None, cfg: ModelConfig | None = None) -> Tokenizer:
    path = resolve_model_path(path)
    try:
        tok = Tokenizer(path / "tokenizer.model")
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{path / 'tokenizer.model'}: not a sentencepiece model ({e})") \
            from None
    if cfg is not None and tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"tokenizer.model has {tok.vocab_size} pieces but config.json "
                              f"'vocab_size' is {cfg.vocab_size}")
    return tok


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


def check_size(cfg: ModelConfig, header: dict, file: Path) -> None:
    """Refuse a config that implies far more weights than the file holds (more than twice:
    anything closer gets the exact per-tensor message), before anything of that size is
    built, even on the meta device. The embedding and the MLPs alone are a lower bound."""
    held = sum(math.prod(shape) for shape, _ in header.values())
    implied = cfg.vocab_size * cfg.d_model + cfg.n_layers * 3 * cfg.d_model * cfg.ffn_dim
    if implied > 2 * held:
        raise CheckpointError(f"{file.parent / 'config.json'} implies at least {implied:,} "
                              f"parameters but {file.name} holds {held:,}")
    if cfg.max_position_embeddings > MAX_POSITIONS:
        raise CheckpointError(f"'max_position_embeddings' {cfg.max_position_embeddings} is "
                              f"more than {MAX_POSITIONS} positions")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The model's tensor shapes, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in ITTModel(cfg).state_dict().items()}


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32,
               fuse: bool = False) -> tuple[ITTModel, Tokenizer]:
    """Load a model directory (default: the shipped model). Returns (model in eval mode, tok).
    The config is checked against the weights file's header before the model is allocated.
    ``fuse``: for serving, fuse each block's projections once (``Block.fuse_projections``)."""
    path = resolve_model_path(path)
    cfg = load_config(path)
    tok = load_tokenizer(path, cfg)
    file = path / "model.safetensors"
    header = read_header(file)
    check_size(cfg, header, file)
    expected = expected_shapes(cfg)
    unknown = sorted(set(header) - set(expected))
    missing = sorted(set(expected) - set(header))
    if unknown:
        raise CheckpointError(f"model.safetensors has unknown tensor(s) {unknown[:5]}"
                              f"{' …' if len(unknown) > 5 else ''} for this config")
    if missing:
        raise CheckpointError(f"model.safetensors is missing tensor(s) {missing[:5]}"
                              f"{' …' if len(missing) > 5 else ''}")
    for k in sorted(header):
        shape, file_dtype = header[k]
        if shape != expected[k]:
            raise CheckpointError(f"model.safetensors: tensor {k!r} has shape {list(shape)}, "
                                  f"config.json implies {list(expected[k])}")
        if file_dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"model.safetensors: tensor {k!r} is {file_dtype}, not "
                                  "finite floating point")
    model = ITTModel(cfg)
    state = model.state_dict()
    try:
        with safe_open(str(file), framework="pt") as f, torch.no_grad():
            for k in sorted(header):
                v = f.get_tensor(k)
                if not torch.isfinite(v).all():
                    raise CheckpointError(f"model.safetensors: tensor {k!r} is not finite "
                                          "floating point")
                state[k].copy_(v)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None
    model = model.to(device=device, dtype=dtype).eval()
    if fuse:
        for layer in model.itt_layer_list:
            layer.block.fuse_projections()
    return model, tok


def save_model(model: ITTModel, tokenizer_file: str | Path, out_dir: str | Path,
               dtype: torch.dtype | None = None) -> Path:
    """Write a complete model directory. ``dtype`` converts the weights (e.g. bf16 to ship)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    if Path(tokenizer_file).resolve() != (out / "tokenizer.model").resolve():
        shutil.copyfile(tokenizer_file, out / "tokenizer.model")
    return out
