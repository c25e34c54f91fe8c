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

from itt_runtime.config import ModelConfig
from itt_runtime.model.itt import ITTModel
from itt_runtime.model.loader import save_model
from itt_runtime.tokenizers.chat_template import ChatTemplateError
from itt_runtime.tokenizers.tokenizer import Tokenizer
from itt_runtime.training import tasks
from itt_runtime.training.arch_flags import load_init, model_config
from itt_runtime.training.chat_tasks import ChatFormat
from itt_runtime.training.finish import CalibrationData, finish_run
from itt_runtime.training.task_trainer import (
    PlainFormat,
    ProblemFormat,
    TaskTrainConfig,
    encode_problems,
    train_char_tokenizer,
    train_tasks,
)
from itt_runtime.training.upcycle import parse_itt_layers, write_checkpoint

CALIB_PROBLEMS = 2000


def calibration_batch(fmt: ProblemFormat, tc: TaskTrainConfig, n: int = CALIB_PROBLEMS):
    """(ids (n, T), valid (n, T)) from the calib split, in the final training mix."""
    gen = tasks.stream("calib", tc.seed, tasks.curriculum_mix(1.0, tc.max_digits))
    ids, _, lengths = encode_problems(fmt, [next(gen) for _ in range(n)])
    return ids, torch.arange(ids.shape[1])[None, :] < lengths[:, None]


def parse_trainable(spec: str, cfg: ModelConfig) -> tuple[int, ...]:
    """``--trainable-layers``: '' (everything), 'itt' (the model's ITT layers) or a
    ``--itt-layers`` spec."""
    if not spec:
        return ()
    if spec == "itt":
        if not cfg.is_itt:
            raise ValueError("--trainable-layers itt: the model has no ITT layers")
        return tuple(cfg.itt_layers)
    return parse_itt_layers(spec, cfg.n_layers)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_task(a: argparse.Namespace) -> int:
    work = a.work_dir or a.out.with_name(a.out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    loaded = None
    if a.init is not None:                 # fine-tuning a checkpoint (issue 30)
        try:
            loaded = load_init(a)
        except ValueError as e:
            log(f"itt-train: error: {e}")
            return 2
        tok, cfg = loaded.tokenizer, loaded.model.cfg
    else:
        tok_file = a.tokenizer or work / "tokenizer.model"
        if not Path(tok_file).exists():
            tok_file = train_char_tokenizer(work / "tokenizer")
        tok = Tokenizer(tok_file)
        cfg = model_config(a, tok)
    try:
        fmt: ProblemFormat = ChatFormat(tok) if a.task_format == "chat" else PlainFormat(tok)
        trainable = parse_trainable(a.trainable_layers, cfg)
    except (ValueError, ChatTemplateError) as e:
        log(f"itt-train: error: {e}")
        return 2
    tc = TaskTrainConfig(
        max_steps=a.max_steps, batch_size=a.batch_size, lr=a.lr, min_lr_ratio=a.min_lr_ratio,
        warmup_steps=a.warmup_steps, weight_decay=a.weight_decay, grad_clip=a.grad_clip,
        eval_every=a.eval_every, eval_problems=a.eval_problems,
        checkpoint_every=a.checkpoint_every, seed=a.seed, max_add_digits=a.max_add_digits,
        max_mul_digits=a.max_mul_digits, curriculum=a.curriculum, stop_at=a.stop_at,
        max_wall_s=a.max_wall_s,
        capacities=tuple(float(c) for c in a.capacities.split(",") if c),
        trainable_layers=trainable, router_warmup_steps=a.router_warmup_steps,
        itt_lr_mult=a.itt_lr_mult)
    n_params = sum(p.numel() for p in (loaded.model if loaded else ITTModel(cfg)).parameters())
    print(f"{n_params / 1e6:.3f}M parameters; {tc.max_steps} steps × {tc.batch_size} problems",
          file=sys.stderr)
    result = train_tasks(cfg, tc, fmt, work, log=log,
                         init=loaded.model if loaded is not None else None)

    def calibration_data() -> CalibrationData:
        return calibration_batch(fmt, tc, a.calib_problems)

    def write(model: ITTModel, dtype: torch.dtype) -> Path:
        if a.init is not None:
            return write_checkpoint(model, a.out, dtype, a.init, loaded)
        return save_model(model, tok_file, a.out, dtype=dtype)

    return finish_run(
        result.model, result.finished, tc.stop_at, a.ship_dtype, calibration_data,
        {"task": "arith", "format": fmt.name, "train_config": dataclasses.asdict(tc),
         "parameters": n_params,
         "steps_done": result.steps_done, "problems_seen": result.steps_done * tc.batch_size,
         "history": result.history},
        t_start, write, log)
