#!/usr/bin/env bash
# Issue 30: does thinking pay on a real pretrained model? SmolLM2-135M-Instruct (the GGUF of
# scripts/fetch_smollm2.sh) upcycled into ITT x4 on layers 14, 16, 18 and 20, fine-tuned on
# sums of up to 4-digit numbers asked in its own chat format, beside the dense control: the
# same model fine-tuned the same way (the same four layers trainable, the same problems in the
# same order, the same steps and learning rate). Two runs side by side, one thread each, each
# resumable from its checkpoint (run the script again) and stopped after MAX_WALL_S seconds at
# most. The exact recipe of docs/MODEL_CARD_SMOLLM2_ARITH.md.
#
#     scripts/train_smollm2_arith.sh            # RUNS=/tmp/smollm2_arith by default
#
# ROUTED_PHI=x (default 0: the exact upcycle of ITT_SPEC) starts the routed steps' step
# encodings at x instead of 0, so that they are in use, and get gradient, from the first step
# (recipe v2 of the model card; the upcycled model then no longer equals the dense one before
# training). The dense control ignores it.
#
# TRAIN_CAPACITY=c (default 0.75) is the routed steps' capacity in training and the model's
# default think budget (recipe v3 of the model card: 1, every token takes every step).
# DENSE=0 trains the ITT model only, for a recipe whose dense control has already run (one
# that changes nothing the dense run reads: ROUTED_PHI, TRAIN_CAPACITY).
#
# Pause both runs while anything is being timed on the machine (kill -STOP / -CONT their
# pids): on 2 cores a training run corrupts every timing taken beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-/tmp/smollm2_arith}
GGUF=$(scripts/fetch_smollm2.sh)
mkdir -p "$RUNS"
if [ ! -f "$RUNS/itt_init/config.json" ]; then
  itt-upcycle "$GGUF" "$RUNS/itt_init" --itt-layers 14,16,18,20 --think-steps 4 \
    --train-capacity "${TRAIN_CAPACITY:-0.75}"
  if [ "${ROUTED_PHI:-0}" != 0 ]; then
    python - "$RUNS/itt_init" "$ROUTED_PHI" <<'PY'
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

path, value = Path(sys.argv[1]) / "model.safetensors", float(sys.argv[2])
weights = load_file(path)
for name, phi in weights.items():
    if name.endswith(".phi"):
        phi[1:] = value                 # rows t >= 1: the routed steps; row 0 stays 1
save_file(weights, path, metadata={"format": "pt"})
PY
  fi
fi
common=(--task arith --task-format chat --trainable-layers 14,16,18,20 --batch-size 16
        --max-steps "${STEPS:-300}" --lr 3e-4 --warmup-steps 30 --eval-every 100
        --eval-problems 100 --checkpoint-every 25 --max-add-digits 4 --no-curriculum
        --ship-dtype float32 --max-wall-s "${MAX_WALL_S:-0}")
export OMP_NUM_THREADS=1
# Calibration on 300 problems, as smollm2_arith_delta.py extract does again on the rounded
# weights: the default 2,000 runs the whole model 20 times over 2,000 chat-formatted problems,
# about 2.5 hours on one thread.
itt-train --init "$RUNS/itt_init" --out "$RUNS/itt" "${common[@]}" --itt-lr-mult 10 \
  --calib-problems 300 > "$RUNS/itt.log" 2>&1 &
if [ "${DENSE:-1}" != 0 ]; then
  itt-train --init "$GGUF" --out "$RUNS/dense" "${common[@]}" > "$RUNS/dense.log" 2>&1 &
fi
wait
