#!/usr/bin/env bash
# Is upcycling worth it? (docs/MODEL_CARD_UPCYCLE.md.) From one dense checkpoint,
# continue (a) dense and (b) upcycled ITT x4 (odd layers, 4 think steps, capacity 0.6, as the
# default model) on the same batches for the same number of tokens with the same LR schedule,
# one thread each, side by side; then evaluate both and the base on the held-out text.
#
#   scripts/upcycle_experiment.sh            # the recipe of docs/MODEL_CARD_UPCYCLE.md
#   BASE=runs/dense scripts/upcycle_experiment.sh   # start from another dense checkpoint
#
# Environment knobs (defaults = the reported run): BASE, STEPS, BATCH, SEQ, LR, WARMUP,
# ROUTER_WARMUP, ITT_LR_MULT, MAX_WALL_S, TRAIN, HELDOUT, CALIB, OUT (prefix of every output).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/up}
TRAIN=${TRAIN:-corpus/train.txt}
HELDOUT=${HELDOUT:-corpus/heldout.txt}
CALIB=${CALIB:-corpus/calib.txt}
SEQ=${SEQ:-256}
BATCH=${BATCH:-8}
export OMP_NUM_THREADS=1

# 1. The base dense model, if none is given. The default recipe's shape (scripts/
# train_default.sh) in fp32: on a CPU without bf16 instructions (AVX2 only) bf16 autocast is
# ~16x slower than fp32. A 400-step schedule stopped and shipped at step 200 (time budget).
BASE=${BASE:-${OUT}_base}
if [ ! -f "$BASE/config.json" ]; then
  base=(--train "$TRAIN" --heldout "$HELDOUT" --tokenizer itt_runtime/checkpoints/default/tokenizer.model
        --d-model 256 --n-layers 8 --n-heads 8 --n-kv-heads 4 --ffn-dim 688 --seq-len "$SEQ"
        --batch-size "$BATCH" --lr 2e-3 --warmup-steps 50 --eval-every 100
        --checkpoint-every 50 --no-bf16 --itt-layers none --out "$BASE")
  itt-train "${base[@]}" --max-steps "${BASE_SCHEDULE:-400}" --stop-at "${BASE_STEPS:-200}" \
    > "$BASE.log" 2>&1
  itt-train "${base[@]}" --max-steps "${BASE_STEPS:-200}" >> "$BASE.log" 2>&1   # ship it
fi

# 2. Upcycle: odd layers become ITT x4 computing exactly the base's function.
rm -rf "${OUT}_itt_init"
python -m itt_runtime.training.upcycle "$BASE" "${OUT}_itt_init" --itt-layers odd \
  --think-steps 4 --train-capacity 0.6

# 3. Continue both on the same batches (same --seed) with the same schedule. The ITT run
# trains only phi and the routers for its first ROUTER_WARMUP steps (the backbone stays the
# base's) and phi/routers at ITT_LR_MULT x the LR (they start from zero; see trainer.py).
common=(--train "$TRAIN" --heldout "$HELDOUT" --calib "$CALIB" --seq-len "$SEQ"
        --batch-size "$BATCH" --max-steps "${STEPS:-100}" --lr "${LR:-1e-3}"
        --warmup-steps "${WARMUP:-10}" --eval-every 50 --checkpoint-every 25 --no-bf16
        --max-wall-s "${MAX_WALL_S:-0}")
# The ablation (c) "itt_plain" trains the upcycled model with neither (all parameters from
# step one, one LR).
rm -rf "${OUT}_dense" "${OUT}_dense.work" "${OUT}_itt" "${OUT}_itt.work" "${OUT}_itt_plain" \
  "${OUT}_itt_plain.work"
itt-train --init "$BASE" --out "${OUT}_dense" "${common[@]}" > "${OUT}_dense.log" 2>&1 &
itt-train --init "${OUT}_itt_init" --out "${OUT}_itt" "${common[@]}" \
  --router-warmup-steps "${ROUTER_WARMUP:-10}" --itt-lr-mult "${ITT_LR_MULT:-5}" \
  > "${OUT}_itt.log" 2>&1 &
itt-train --init "${OUT}_itt_init" --out "${OUT}_itt_plain" "${common[@]}" \
  --router-warmup-steps 0 --itt-lr-mult 1 > "${OUT}_itt_plain.log" 2>&1 &
wait

# 4. Held-out perplexity (itt-eval, causal mode) and the routed fraction per budget.
itt-eval --model "$BASE" --text "$HELDOUT" --budgets 0 --json > "${OUT}_eval_base.json"
itt-eval --model "${OUT}_dense" --text "$HELDOUT" --budgets 0 --json > "${OUT}_eval_dense.json"
for m in itt itt_plain; do
  itt-eval --model "${OUT}_$m" --text "$HELDOUT" --budgets 0,0.25,0.5,0.6,0.75,1 --json \
    > "${OUT}_eval_$m.json"
done
python - "$OUT" <<'EOF'
import json, sys
sys.path.insert(0, "scripts")
from eval_table import budget_table
out = sys.argv[1]
base, dense = (json.load(open(f"{out}_eval_{n}.json")) for n in ("base", "dense"))
b, d = base["rows"][0]["ppl"], dense["rows"][0]["ppl"]
print(f"Held-out tokens: {dense['tokens']}. Base dense: **{b:.2f}**. "
      f"Continued dense: **{d:.2f}**.")
for name in ("itt", "itt_plain"):
    itt = json.load(open(f"{out}_eval_{name}.json"))
    print(f"\n{name}:\n")
    print("\n".join(budget_table(itt, d, "upcycled ITT")))
    pm = itt["paper_mode"]
    print(f"\nPaper (top-k) mode at capacity {pm['capacity']}: ppl {pm['ppl']:.2f}.")
EOF
