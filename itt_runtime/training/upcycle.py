"""itt-upcycle: turn a dense checkpoint into an ITT checkpoint that computes the same function.

    itt-upcycle SRC_DIR DST_DIR [--itt-layers odd|even|all|1,3,5] [--think-steps 4]
                [--train-capacity 0.6] [--calib FILE] [--dtype auto|float32|bfloat16|float16]

ITT_SPEC "Upcycling a dense model": the listed layers become ITT layers ×S whose base step is
the dense layer (φ_0 = 1) and whose routed steps add nothing yet (φ_t = 0 for t ≥ 1), so the
upcycled model's logits equal the dense model's at every think budget. Training
(``itt-train --init DST_DIR``) then grows φ_t and the routers.

Decisions (the issue leaves them open):

- Routers start as small random linear maps (weights N(0, 0.02²), the trainer's init for
  routers; bias 0), not zero weights. With φ_t = 0 the router gets no gradient until φ_t has
  moved (its score multiplies φ_t ⊙ Δ), whatever its init, so the init only decides *which*
  tokens top-k training routes in the first steps. Zero weights tie every score, and top-k
  then routes an arbitrary, position-driven set (in practice the first ceil(ρ·n) positions of
  every window), which teaches φ_t on a biased sample; small random weights route a
  token-dependent set from step one. The seed is ``--seed``, so the output is reproducible.
- ``--calib FILE`` (optional) calibrates the causal thresholds on that text, so that a
  mid budget routes the requested fraction of tokens (compute and KV honesty) even before
  training; without it the model has thresholds only at budgets 0 and 1
  (``ModelConfig.thresholds_for``), which is enough for an input to ``itt-train --init``,
  whose run calibrates again on its own ``--calib`` text after training.
- The weights keep the source's dtype by default (``--dtype auto``): the dense tensors are
  copied bit for bit, and φ's 0/1 are exact in every float dtype.
- Tokenizer files (``tokenizer.model``, ``tokenizer.json``, ``tokenizer_config.json``, …)
  are copied as they are; nothing about the vocabulary changes.
- A GGUF source (``SRC.gguf``) is dequantized at load; its weights are written in fp32 with
  ``--dtype auto`` (every GGUF block format is exact in fp32), and the tokenizer built from
  its vocabulary is written as tokenizer.json + tokenizer_config.json (with its chat
  template), so that the upcycled directory needs neither the GGUF nor llama.cpp. Sampling
  defaults the file states go to generation_config.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import cast

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from itt_runtime.config import ConfigError
from itt_runtime.model import gguf
from itt_runtime.model.hf import GENERATION_DEFAULTS, GENERATION_FILE
from itt_runtime.model.itt import ITTModel
from itt_runtime.model.loader import LoadedModel, load_checkpoint
from itt_runtime.tokenizers.hf_tokenizer import HFTokenizer
from itt_runtime.training.calibrate import calibrate
from itt_runtime.training.data import encode_corpus, eval_windows

# Everything a model directory may hold besides its weights and config.json: copied as is.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "generation_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class UpcycleError(ValueError):
    """Bad input to itt-upcycle; the message names the problem."""


def parse_itt_layers(spec: str, n_layers: int) -> tuple[int, ...]:
    """``--itt-layers`` of itt-upcycle and itt-train: 'odd' (1, 3, 5 …: every other layer,
    as in the paper and the default model), 'even', 'all', 'none' (a dense model), or a
    comma-separated list of layer indices."""
    if spec == "none":
        return ()
    if spec == "odd":
        return tuple(range(1, n_layers, 2))
    if spec == "even":
        return tuple(range(0, n_layers, 2))
    if spec == "all":
        return tuple(range(n_layers))
    try:
        layers = sorted({int(x) for x in spec.split(",")})
    except ValueError:
        raise UpcycleError(f"--itt-layers must be odd, even, all or a list like 1,3,5; "
                           f"got {spec!r}") from None
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise UpcycleError(f"--itt-layers: layer index {bad[0]} is out of range; the source "
                           f"model has {n_layers} layers (0 … {n_layers - 1})")
    return tuple(layers)


def upcycle(dense: ITTModel, itt_layers: tuple[int, ...], think_steps: int,
            train_capacity: float, seed: int = 0) -> ITTModel:
    """The ITT model whose ``itt_layers`` run ×``think_steps`` on top of ``dense``'s weights,
    computing exactly ``dense``'s function (φ_0 = 1, φ_t = 0 for t ≥ 1)."""
    cfg = dense.cfg
    if cfg.is_itt:
        raise UpcycleError(f"the source is already an ITT model (itt_layers "
                           f"{list(cfg.itt_layers)}, think_steps {cfg.think_steps}); "
                           "itt-upcycle takes a dense model")
    if think_steps < 2:
        raise UpcycleError(f"--think-steps must be at least 2 (one base step and one routed "
                           f"step), got {think_steps}")
    if not itt_layers:
        raise UpcycleError("--itt-layers selects no layer")
    try:
        new_cfg = dataclasses.replace(cfg, itt_layers=itt_layers, think_steps=think_steps,
                                      train_capacity=train_capacity, calibration=None,
                                      default_think_budget=None)
    except ConfigError as e:
        raise UpcycleError(str(e).removeprefix("config.json: ")) from None
    torch.manual_seed(seed)
    model = ITTModel(new_cfg).to(next(dense.parameters()).dtype)
    # The block, norm and embedding names are the same in both models; only φ and the routers
    # are new. strict=False would hide a renamed tensor, so the difference is checked.
    result = model.load_state_dict(dense.state_dict(), strict=False)
    new = {k for k in result.missing_keys if k.endswith(".phi") or ".routers." in k}
    if result.unexpected_keys or set(result.missing_keys) != new:
        raise UpcycleError(f"source tensors do not map onto the ITT model: missing "
                           f"{sorted(set(result.missing_keys) - new)[:3]}, unexpected "
                           f"{result.unexpected_keys[:3]}")
    with torch.no_grad():
        for layer in model.itt_layer_list:
            if layer.think_steps > 1:
                layer.phi.zero_()
                layer.phi[0].fill_(1.0)                    # base step = the dense layer
                for r in cast(list[nn.Linear], list(layer.routers)):
                    r.weight.normal_(std=0.02)             # see the module docstring
                    r.bias.zero_()
    model.history, model.finished = [], True
    return model.eval()


def source_dtype(src: Path) -> torch.dtype:
    """The float dtype of the source's weights (its first safetensors file; fp32 for a GGUF,
    dequantized)."""
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for k in f.keys():
                return SAFETENSORS_DTYPES.get(f.get_slice(k).get_dtype(), torch.float32)
    return torch.float32


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy every tokenizer file ``src`` has into ``dst``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and (src / name).resolve() != (dst / name).resolve():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def write_checkpoint(model: ITTModel, out: Path, dtype: torch.dtype, tokenizer_from: Path,
                     loaded: LoadedModel | None = None) -> Path:
    """This project's format (ITT_SPEC "Checkpoint format"): config.json, model.safetensors
    in ``dtype``, and the tokenizer files of the ``tokenizer_from`` directory; for a GGUF
    source (``loaded``: what it loaded as), its tokenizer and sampling defaults, written."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    if loaded is None or not gguf.is_gguf(tokenizer_from):
        copy_tokenizer_files(tokenizer_from, out)
        return out
    if not isinstance(loaded.tokenizer, HFTokenizer):
        raise UpcycleError("the GGUF's tokenizer cannot be written as tokenizer.json")
    loaded.tokenizer.save(out)
    defaults = loaded.generation.sampling_defaults
    if defaults:
        hf_names = {ours: theirs for theirs, ours in GENERATION_DEFAULTS.items()}
        (out / GENERATION_FILE).write_text(json.dumps(
            {hf_names[k]: (0 if k == "top_k" and v == -1 else v) for k, v in defaults.items()},
            indent=2) + "\n")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="itt-upcycle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="dense model directory or GGUF file (anything "
                   "load_model reads)")
    p.add_argument("dst", type=Path, help="ITT model directory to write (must not exist)")
    p.add_argument("--itt-layers", default="odd",
                   help="odd (default, as the paper), even, all, or e.g. 1,3,5")
    p.add_argument("--think-steps", type=int, default=4, help="S of ITT ×S (default 4)")
    p.add_argument("--train-capacity", type=float, default=0.6,
                   help="ρ: fraction routed per step in training; the default budget")
    p.add_argument("--calib", type=Path, help="text to calibrate the causal thresholds on")
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="weights' dtype on disk (auto: the source's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the routers' random init")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        if a.dst.exists() and any(a.dst.iterdir()):
            raise UpcycleError(f"{a.dst} exists and is not empty; choose a new directory")
        if a.calib is not None and not a.calib.is_file():
            raise UpcycleError(f"--calib {a.calib}: no such file")
        loaded = load_checkpoint(a.src)
        dense, tok = loaded.model, loaded.tokenizer
        layers = parse_itt_layers(a.itt_layers, dense.cfg.n_layers)
        model = upcycle(dense, layers, a.think_steps, a.train_capacity, a.seed)
        if a.calib is not None:
            seq_len = min(a.calib_seq_len, model.cfg.max_position_embeddings)
            windows = eval_windows(encode_corpus(tok, a.calib), seq_len, limit=256)[:, :-1]
            model.cfg = dataclasses.replace(model.cfg, calibration=calibrate(model, windows))
        dtype = source_dtype(a.src) if a.dtype == "auto" else DTYPES[a.dtype]
        write_checkpoint(model, a.dst, dtype, a.src, loaded)
    except (ConfigError, UpcycleError, OSError) as e:
        print(f"itt-upcycle: error: {e}", file=sys.stderr)
        return 2
    cfg = model.cfg
    print(f"wrote {a.dst}: layers {list(cfg.itt_layers)} of {cfg.n_layers} as ITT "
          f"x{cfg.think_steps}, train capacity {cfg.train_capacity}, "
          f"{'calibrated on ' + str(a.calib) if a.calib else 'uncalibrated (budgets 0 and 1)'}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
