#!/usr/bin/env bash
# The engine's GPU checks in one run, for a machine with an NVIDIA GPU (about 5 minutes on an
# H200, estimated): the CUDA tests, then itt-bench on CUDA with CUDA graphs and masked routed
# steps, and once more eager with gathered routed steps for the comparison.
#
#   OUT=/tmp/gpu bash scripts/gpu_check.sh
#
# Runs from the repository root without installing the package (PYTHONPATH), so it needs only
# what the engine imports: torch with CUDA, sentencepiece, and transformers for the HF
# baseline. The server's GPU tests (tests/server/test_server_gpu.py) also need the server's
# dependencies; they run when fastapi is importable and are skipped otherwise.
set -uo pipefail
OUT=${OUT:-/tmp/itt-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
    | tee -a "$OUT/gpu.txt"

tests=(tests/runtime)
$PY -c "import fastapi, uvicorn, openai" 2>/dev/null && tests+=(tests/server/test_server_gpu.py)
$PY -m pytest -q -m gpu -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$OUT/gpu_tests.log" \
    || status=1

$PY -m loadtest.bench_engine --device cuda --tokens 128 --json "$OUT/bench_cuda.json" \
    2>&1 | tee "$OUT/bench_cuda.log" || status=1
$PY -m loadtest.bench_engine --device cuda --tokens 128 --enforce-eager \
    --routed-compute gather --sections 1,3 --json "$OUT/bench_cuda_eager_gather.json" \
    2>&1 | tee "$OUT/bench_cuda_eager_gather.log" || status=1
exit $status
