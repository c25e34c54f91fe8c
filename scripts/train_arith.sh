#!/usr/bin/env bash
# Trains the shipped `arith` model and its two controls: the exact recipe of
# docs/MODEL_CARD_ARITH.md. Three runs side by side, one thread each, each stopped after
# WALL_S seconds at most (about an hour on 2 shared CPU cores). Outputs under RUNS (default
# /tmp/arith_runs): itt/ (copy to itt_runtime/checkpoints/arith), dense/, loop/ and their logs.
# The same backbone, the same problems in the same order (the stream is a function of seed
# and step), the same steps; only the ITT part differs.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-/tmp/arith_runs}
STEPS=${STEPS:-3500}
WALL_S=${WALL_S:-3600}
mkdir -p "$RUNS"
common=(--task arith --d-model 128 --n-layers 4 --n-heads 4 --n-kv-heads 2 --ffn-dim 384
        --max-positions 64 --batch-size "${BATCH:-48}" --max-steps "$STEPS" --lr 1e-3
        --warmup-steps 200 --eval-every 500 --checkpoint-every 250 --eval-problems 200
        --max-add-digits 3 --max-mul-digits 3 --ship-dtype float32 --max-wall-s "$WALL_S")
export OMP_NUM_THREADS=1
python -m itt_runtime.training.cli "${common[@]}" --itt-layers odd --think-steps 4 \
  --train-capacity 0.75 --out "$RUNS/itt" > "$RUNS/itt.log" 2>&1 &
python -m itt_runtime.training.cli "${common[@]}" --itt-layers none --out "$RUNS/dense" \
  > "$RUNS/dense.log" 2>&1 &
python -m itt_runtime.training.cli "${common[@]}" --itt-layers odd --think-steps 4 \
  --train-capacity 1.0 --out "$RUNS/loop" > "$RUNS/loop.log" 2>&1 &
wait
