"""``itt-train --task arith``: tokenizer, training, calibration and shipping for the task stream.

Calibration uses problems of the ``calib`` split drawn from the final training mix, one
problem per row, padding excluded from the quantiles (calibrate.py ``valid``). The sequence
calibrated is what serving computes: BOS, prompt and answer (the final EOS is never an input).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from itt_runtime.model.itt import ITTModel
from itt_runtime.model.loader import save_model
from itt_runtime.tokenizers.tokenizer import Tokenizer
from itt_runtime.training import tasks
from itt_runtime.training.arch_flags import model_config
from itt_runtime.training.finish import CalibrationData, finish_run
from itt_runtime.training.task_trainer import (
    TaskTrainConfig,
    encode_problems,
    train_char_tokenizer,
    train_tasks,
)

CALIB_PROBLEMS = 2000


def calibration_batch(tok: Tokenizer, tc: TaskTrainConfig, n: int = CALIB_PROBLEMS):
    """(ids (n, T), valid (n, T)) from the calib split, in the final training mix."""
    gen = tasks.stream("calib", tc.seed, tasks.curriculum_mix(1.0, tc.max_digits))
    ids, _, lengths = encode_problems(tok, [next(gen) for _ in range(n)])
    return ids, torch.arange(ids.shape[1])[None, :] < lengths[:, None]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_task(a: argparse.Namespace) -> int:
    work = a.work_dir or a.out.with_name(a.out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    tok_file = a.tokenizer or work / "tokenizer.model"
    if not Path(tok_file).exists():
        tok_file = train_char_tokenizer(work / "tokenizer")
    tok = Tokenizer(tok_file)
    cfg = model_config(a, tok)
    tc = TaskTrainConfig(
        max_steps=a.max_steps, batch_size=a.batch_size, lr=a.lr, min_lr_ratio=a.min_lr_ratio,
        warmup_steps=a.warmup_steps, weight_decay=a.weight_decay, grad_clip=a.grad_clip,
        eval_every=a.eval_every, eval_problems=a.eval_problems,
        checkpoint_every=a.checkpoint_every, seed=a.seed, max_add_digits=a.max_add_digits,
        max_mul_digits=a.max_mul_digits, curriculum=a.curriculum, stop_at=a.stop_at,
        max_wall_s=a.max_wall_s,
        capacities=tuple(float(c) for c in a.capacities.split(",") if c))
    n_params = sum(p.numel() for p in ITTModel(cfg).parameters())
    print(f"{n_params / 1e6:.3f}M parameters; {tc.max_steps} steps × {tc.batch_size} problems",
          file=sys.stderr)
    result = train_tasks(cfg, tc, tok, work, log=log)
    def calibration_data() -> CalibrationData:
        return calibration_batch(tok, tc)

    def write(model: ITTModel, dtype: torch.dtype) -> Path:
        return save_model(model, tok_file, a.out, dtype=dtype)

    return finish_run(
        result.model, result.finished, tc.stop_at, a.ship_dtype, calibration_data,
        {"task": "arith", "train_config": dataclasses.asdict(tc), "parameters": n_params,
         "steps_done": result.steps_done, "problems_seen": result.steps_done * tc.batch_size,
         "history": result.history},
        t_start, write, log)
