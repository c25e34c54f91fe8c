#!/usr/bin/env bash
# Installs itt-server into the current Python environment (a venv is recommended).
#   bash scripts/install.sh          # the server
#   bash scripts/install.sh --test   # plus what the test suite needs (extras, the pinned
#                                    # clients of tests/clients, Prometheus)
# On a machine without an NVIDIA GPU it installs the CPU build of torch first, so that pip
# does not pull the multi-GB CUDA build; with a GPU, pip's default (CUDA) torch is used.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install "torch>=2.4"
  else
    # PyTorch's CPU index first (PyPI's Linux wheel is the CUDA build); where that index is
    # out of reach, plain pip (a machine with a local CPU wheel, as our CI has).
    "$PY" -m pip install --timeout 10 --retries 0 \
        --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
      || "$PY" -m pip install "torch==${TORCH_VERSION}"
  fi
fi
if [[ "${1:-}" == "--test" ]]; then
  "$PY" -m pip install -e '.[test,loadtest,clients]'
  if ! command -v promtool >/dev/null 2>&1; then
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq prometheus
  fi
else
  "$PY" -m pip install -e .
fi
