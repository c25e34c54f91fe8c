#!/usr/bin/env bash
# Installs what the tests need, runs the linters (ruff with import sorting, mypy; both
# configured in pyproject.toml), then the CPU test suite (slow and GPU tests are opt-in:
# `python -m pytest -m slow`, `python -m pytest -m gpu`). Extra arguments go to pytest.
# It fetches the real GGUF model first (scripts/fetch_smollm2.sh) unless ITT_NO_FETCH is set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
"${PYTHON:-python3}" -m ruff check .
"${PYTHON:-python3}" -m mypy
# The real GGUF model (85 MB, seconds to fetch; cached): its tests skip when it is absent, so
# an offline run still passes. ITT_NO_FETCH=1 skips the attempt.
if [ -z "${ITT_NO_FETCH:-}" ]; then
    PYTHON="${PYTHON:-python3}" bash scripts/fetch_smollm2.sh >/dev/null \
        || echo "test.sh: could not fetch the SmolLM2 GGUF; its tests will skip" >&2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${PYTHON:-python3}" -m pytest -q "$@"
