#!/usr/bin/env bash
# Installs what the tests need, runs the linters (ruff with import sorting, mypy; both
# configured in pyproject.toml), then the CPU test suite (slow and GPU tests are opt-in:
# `python -m pytest -m slow`, `python -m pytest -m gpu`). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
"${PYTHON:-python3}" -m ruff check .
"${PYTHON:-python3}" -m mypy
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${PYTHON:-python3}" -m pytest -q "$@"
