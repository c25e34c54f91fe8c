"""The end of a training run, the same for text and task runs: stop early when asked (the run
resumes from its checkpoint), round the weights to the dtype they ship in, calibrate the
routing thresholds on those weights (ITT models), record how the model was trained in
config.json, and write the model directory."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch

from itt_runtime.model.itt import ITTModel
from itt_runtime.training.calibrate import calibrate

# Held-out token ids to calibrate on, (N, T), and which positions count (None: all).
CalibrationData = tuple[torch.Tensor, torch.Tensor | None]


def round_to_ship_dtype(model: ITTModel, name: str) -> torch.dtype:
    """Round the weights to the dtype they ship in (kept in fp32), so that routing is
    calibrated on the weights as they will be served. Returns that dtype."""
    ship_dtype = getattr(torch, name)
    with torch.no_grad():
        for t in model.parameters():
            t.copy_(t.to(ship_dtype).float())
    return ship_dtype


def finish_run(model: ITTModel, finished: bool, stop_at: int, ship_dtype: str,
               calibration_data: Callable[[], CalibrationData], training: dict,
               started: float, write: Callable[[ITTModel, torch.dtype], Path],
               log: Callable[[str], None]) -> int:
    """Ship ``model`` (or say how to resume if the run stopped at ``--stop-at``): returns
    the exit code. ``training``: what config.json's ``extra._training`` records, to which
    the wall time since ``started`` is added; ``write(model, dtype)`` writes the directory."""
    if not finished:
        log(f"stopped at step {stop_at}; run again without --stop-at to resume")
        return 0
    dtype = round_to_ship_dtype(model, ship_dtype)
    if model.cfg.is_itt:
        log("calibrating routing thresholds on held-out data …")
        ids, valid = calibration_data()
        model.cfg = dataclasses.replace(model.cfg, calibration=calibrate(model, ids, valid=valid))
    training = {**training, "wall_time_s": round(time.time() - started)}
    model.cfg = dataclasses.replace(model.cfg, extra={"_training": training})
    log(f"wrote {write(model, dtype)}")
    return 0
