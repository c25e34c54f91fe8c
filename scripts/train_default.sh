#!/usr/bin/env bash
# Rebuilds the corpus and trains the shipped default ITT model and its dense control.
# The exact recipe of docs/MODEL_CARD.md. About an hour on 2 CPU cores (both runs in parallel,
# one thread each). Outputs: runs/itt (copied to itt_runtime/checkpoints/default) and runs/dense.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v bible >/dev/null; then
  apt-get update && apt-get install -y bible-kjv-text dict-jargon fortunes
fi
python -m itt_runtime.training.corpus corpus
python -c "from pathlib import Path; from itt_runtime.training.cli import train_tokenizer; \
train_tokenizer([Path('corpus/train.txt')], 8192, Path('runs/tokenizer'))"
common=(--train corpus/train.txt --heldout corpus/heldout.txt --calib corpus/calib.txt
        --tokenizer runs/tokenizer.model --d-model 256 --n-layers 8 --n-heads 8 --n-kv-heads 4
        --ffn-dim 688 --seq-len 256 --batch-size 16 --max-steps "${STEPS:-700}" --lr 2e-3
        --warmup-steps 50 --eval-every 100 --checkpoint-every 50 --bf16)
OMP_NUM_THREADS=1 itt-train "${common[@]}" --itt-layers odd --think-steps 4 \
  --train-capacity 0.6 --out runs/itt > runs/itt.log 2>&1 &
OMP_NUM_THREADS=1 itt-train "${common[@]}" --itt-layers none --out runs/dense \
  > runs/dense.log 2>&1 &
wait
