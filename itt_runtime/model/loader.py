"""Checkpoint format (ITT_SPEC): a directory with config.json, model.safetensors, tokenizer.model.

A Hugging Face LLaMA-family directory (config.json naming an architecture, weights in one file
or in shards) is read too, through the adapter in ``hf.py``, as a dense model; so is a GGUF file
(llama.cpp's format: ``gguf.py``), its tensors dequantized into the model's dtype.

``load_model`` checks everything before torch sees it, so that a bad directory fails with a
``CheckpointError`` naming the problem rather than a stack trace from deep inside torch. The
model is built on the meta device and its parameters materialised one tensor at a time from
memory-mapped safetensors (or dequantized from the memory-mapped GGUF), so that loading holds
at most one extra copy of one tensor. Every format reaches the same loop (``_materialize``)
through ``TensorSource``: where a tensor is, and how to read it.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from itt_runtime.checkpoints import resolve_model_path
from itt_runtime.config import CheckpointError, ConfigError, ModelConfig, read_json_object
from itt_runtime.model import gguf, hf
from itt_runtime.model.itt import ITTModel
from itt_runtime.model.layers import Rotary, input_major_view
from itt_runtime.tokenizers.gguf_vocab import gguf_tokenizer
from itt_runtime.tokenizers.loader import TOKENIZER_FILES, check_vocabulary, load_tokenizer
from itt_runtime.tokenizers.plain_chat import plain_tokenizer_config
from itt_runtime.tokenizers.tokenizer import Tokenizer, TokenizerError

FILES = ("config.json", "model.safetensors", "tokenizer.model")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def load_config(path: str | Path | None) -> ModelConfig:
    path = resolve_model_path(path)
    if gguf.is_gguf(path):
        return gguf.config_from_gguf(gguf.open_gguf(path))
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
    where = f"{', '.join(f.name for f in headers)} hold{'s' if len(headers) == 1 else ''}"
    check_implied_size(cfg, held, str(path / "config.json"), where)


def check_implied_size(cfg: ModelConfig, held: int, config_name: str, where: str) -> None:
    """``check_size`` given the number of values the files hold (``where``: "x.gguf holds")."""
    implied = cfg.vocab_size * cfg.d_model + cfg.n_layers * 3 * cfg.d_model * cfg.ffn_dim
    if implied > 2 * held:
        raise CheckpointError(f"{config_name} implies at least {implied:,} parameters but "
                              f"{where} {held:,}")
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


@dataclass(frozen=True)
class TensorSource:
    """One model tensor in a checkpoint: the file and the name it has there (for messages),
    and ``read(device, dtype)``, which returns a copy of it (never a view of a file mapping)."""
    file: Path
    name: str
    read: Callable[[torch.device, torch.dtype], torch.Tensor]


def safetensors_sources(weights: dict[str, tuple[Path, str]]) -> dict[str, TensorSource]:
    """``locate_weights``' answer as sources: one file mapping per tensor, closed after it,
    so that its pages leave the process."""
    def reader(file: Path, name: str) -> Callable[[torch.device, torch.dtype], torch.Tensor]:
        def read(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    mapped = f.get_tensor(name)
                    return mapped.to(device=device, dtype=dtype, copy=True)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: unreadable ({e})") from None
        return read
    return {key: TensorSource(file, name, reader(file, name))
            for key, (file, name) in weights.items()}


def gguf_sources(ck: gguf.GGUFCheckpoint, cfg: ModelConfig) -> dict[str, TensorSource]:
    """The GGUF file's tensors as sources, after checking names, shapes and types (and the
    config's size against the values the file holds) before anything is allocated."""
    held = sum(int(t.n_elements) for t in ck.tensors.values())
    check_implied_size(cfg, held, f"{ck.path.name}'s metadata", f"{ck.path.name} holds")
    located = gguf.locate_tensors(ck, cfg, expected_shapes(cfg))

    def reader(t: gguf.GGUFTensor) -> Callable[[torch.device, torch.dtype], torch.Tensor]:
        def read(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
            return t.read().to(device=device, dtype=dtype)      # read() is a fresh array
        return read
    return {key: TensorSource(ck.path, t.name, reader(t)) for key, t in located.items()}


@dataclass(frozen=True)
class LoadedModel:
    """``load_checkpoint``'s answer: the model (eval mode), its tokenizer, and what the
    checkpoint says about generation (generation_config.json, or a GGUF's metadata)."""
    model: ITTModel
    tokenizer: Tokenizer
    generation: hf.GenerationConfig


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, fuse: bool = False,
               tokenizer: str | Path | None = None) -> tuple[ITTModel, Tokenizer]:
    """Load a model directory (default: the shipped model), a Hugging Face LLaMA-family
    directory or a GGUF file. Returns (model in eval mode, tok); see ``load_checkpoint``."""
    loaded = load_checkpoint(path, device, dtype, fuse, tokenizer)
    return loaded.model, loaded.tokenizer


def load_checkpoint(path: str | Path | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, fuse: bool = False,
                    tokenizer: str | Path | None = None) -> LoadedModel:
    """Load a model directory, a Hugging Face directory or a GGUF file. The config is checked
    against the weight files' headers (the GGUF's tensor table) before anything is allocated;
    then the model is built on the meta device and each tensor is read (memory-mapped; a GGUF
    tensor dequantized), converted to ``dtype`` on ``device`` and put in place one at a time,
    largest first, so that the peak is the model plus one tensor's two copies.
    ``fuse``: for serving, fuse each block's projections once (``Block.fuse_projections``).
    ``tokenizer``: a directory whose tokenizer to use instead of the checkpoint's (as vLLM's
    ``--tokenizer``; for a GGUF, a Hugging Face tokenizer of the same vocabulary)."""
    path = resolve_model_path(path)
    if gguf.is_gguf(path):
        ck = gguf.open_gguf(path)
        cfg = gguf.config_from_gguf(ck)
        sources = gguf_sources(ck, cfg)
        tok = load_tokenizer(tokenizer, cfg) if tokenizer is not None \
            else gguf_model_tokenizer(ck, cfg)
        generation = gguf.generation_config(ck, cfg)
        del ck                  # the mapping closes with the sources, after the load
    else:
        cfg = load_config(path)
        tok = load_tokenizer(path if tokenizer is None else tokenizer, cfg)
        sources = safetensors_sources(locate_weights(path, cfg))
        generation = hf.read_generation_config(path)
    model = _materialize(cfg, sources, torch.device(device), dtype, fuse)
    return LoadedModel(model, tok, generation)


def gguf_model_tokenizer(ck: gguf.GGUFCheckpoint, cfg: ModelConfig) -> Tokenizer:
    """The tokenizer of an opened GGUF file, checked against its model config."""
    try:
        tok = gguf_tokenizer(ck.metadata, ck.path)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    return check_vocabulary(tok, cfg, ck.path.name, gguf.ROWS)


def _materialize(cfg: ModelConfig, sources: dict[str, TensorSource], device: torch.device,
                 dtype: torch.dtype, fuse: bool) -> ITTModel:
    """The model of ``cfg`` with every tensor read from ``sources`` (one at a time, largest
    first), in eval mode; fused for serving when ``fuse``."""
    model = meta_model(cfg)
    model.rotary = Rotary(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                          cfg.rope_scaling).to(device=device, dtype=dtype)
    sizes = {k: math.prod(model.get_parameter(k).shape) for k in sources}
    with torch.no_grad():
        for key in sorted(sources, key=lambda k: -sizes[k]):
            src = sources[key]
            value = src.read(device, dtype)
            if not all_finite(value):
                raise CheckpointError(f"{src.file.name}: tensor {src.name!r} is not finite "
                                      "floating point")
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
    return model


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
