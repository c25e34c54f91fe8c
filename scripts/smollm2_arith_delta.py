"""The SmolLM2 arithmetic ITT model (issue 30) as the repository ships it: a small delta over
the public GGUF file, and the step that rebuilds the full model from the two.

    python scripts/smollm2_arith_delta.py extract RUN_DIR DELTA_DIR   # after training
    python scripts/smollm2_arith_delta.py build DELTA_DIR OUT_DIR [--gguf FILE]

``extract`` keeps only what training changed — the trainable layers (their blocks, φ and
routers) — in bf16, recalibrates the routing thresholds on the weights as rounded (so the
budgets stay honest for the model users rebuild), and writes ``delta.safetensors`` and the
full ``config.json`` (architecture, calibration, training record). ``build`` upcycles the
GGUF file (scripts/fetch_smollm2.sh; its SHA-256 is checked there) exactly as the training
run did, puts the delta's tensors in place and writes a model directory that ``itt-server
--model`` serves. Everything outside the delta is the GGUF's own weights, dequantized.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from itt_runtime.config import ModelConfig
from itt_runtime.model.loader import load_checkpoint, load_model
from itt_runtime.training.calibrate import calibrate
from itt_runtime.training.chat_tasks import ChatFormat
from itt_runtime.training.task_cli import calibration_batch
from itt_runtime.training.task_trainer import TaskTrainConfig
from itt_runtime.training.upcycle import upcycle, write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CALIB_PROBLEMS = 300


def delta_names(model, layers) -> list[str]:
    return [k for k in model.state_dict() if any(k.startswith(f"layers.{i}.") for i in layers)]


@torch.no_grad()
def extract(run_dir: Path, out: Path) -> None:
    model, tok = load_model(run_dir)
    record = model.cfg.extra["_training"]
    layers = record["train_config"]["trainable_layers"]
    names = delta_names(model, layers)
    state = model.state_dict()
    for k in names:
        state[k].copy_(state[k].to(torch.bfloat16).float())
    tc = TaskTrainConfig(**{k: v for k, v in record["train_config"].items()
                            if k in {f.name for f in dataclasses.fields(TaskTrainConfig)}})
    ids, valid = calibration_batch(ChatFormat(tok), tc, CALIB_PROBLEMS)
    cfg = dataclasses.replace(model.cfg, calibration=calibrate(model, ids, valid=valid))
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: state[k].to(torch.bfloat16).contiguous() for k in names},
              str(out / "delta.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    print(f"wrote {out}: {len(names)} tensors of layers {layers}, "
          f"{sum(state[k].numel() for k in names) / 1e6:.1f}M parameters", file=sys.stderr)


@torch.no_grad()
def build(delta: Path, out: Path, gguf_file: Path | None) -> None:
    if gguf_file is None:
        gguf_file = Path(subprocess.run([str(ROOT / "scripts" / "fetch_smollm2.sh")],
                                        check=True, capture_output=True, text=True)
                         .stdout.strip())
    cfg = ModelConfig.from_dict(json.loads((delta / "config.json").read_text()))
    loaded = load_checkpoint(gguf_file)
    model = upcycle(loaded.model, tuple(cfg.itt_layers), cfg.think_steps, cfg.train_capacity)
    tensors = load_file(str(delta / "delta.safetensors"))
    state = model.state_dict()
    missing = [k for k in tensors if k not in state]
    if missing:
        raise SystemExit(f"build: the delta names tensors the model lacks: {missing[:3]}")
    for k, v in tensors.items():
        if v.shape != state[k].shape:
            raise SystemExit(f"build: {k} has shape {tuple(v.shape)}, the model "
                             f"{tuple(state[k].shape)}")
        state[k].copy_(v.float())
    model.cfg = cfg
    write_checkpoint(model, out, torch.float32, gguf_file, loaded)
    print(f"wrote {out}", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("run_dir", type=Path)
    e.add_argument("delta_dir", type=Path)
    b = sub.add_parser("build")
    b.add_argument("delta_dir", type=Path)
    b.add_argument("out_dir", type=Path)
    b.add_argument("--gguf", type=Path, help="default: scripts/fetch_smollm2.sh's file")
    a = p.parse_args(argv)
    if a.cmd == "extract":
        extract(a.run_dir, a.delta_dir)
    else:
        build(a.delta_dir, a.out_dir, a.gguf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
