# syntax=docker/dockerfile:1
# itt-server: an OpenAI-compatible server for Inner Thinking Transformer models.
#
#   docker build -t itt-server .                                  # CUDA (default)
#   docker build --build-arg VARIANT=cpu -t itt-server:cpu .      # CPU only, no CUDA libraries
#   docker run --gpus all -p 8000:8000 itt-server [itt-server flags, e.g. --default-think-budget 0.5]
#
# The install steps are the README's (deploy/README.md, "Install steps"); tests/deploy/
# test_dockerfile.py keeps the two in sync, so the test suite's own install exercises them.

ARG VARIANT=cuda
ARG TORCH_VERSION=2.13.0

# The CUDA base already ships this torch with CUDA and cuDNN, so the torch step below is a no-op
# there; the index URL only matters if the base's torch ever drifts from TORCH_VERSION.
FROM pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime AS base-cuda
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

# A slim Python with the CPU-only wheel: an image about a tenth of the CUDA one.
FROM python:3.11-slim AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# base-${VARIANT} names one of the two stages above, not a registry image.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG TORCH_VERSION
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Install step 1: torch, in its own layer so that source edits do not re-download it.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# Install step 2: the package. .dockerignore admits only what it needs, including the default
# model (package data under itt_runtime/models/default), so the image serves with no arguments.
WORKDIR /opt/itt-server
COPY . .
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 1000 --user-group --shell /usr/sbin/nologin itt

USER 1000:1000
EXPOSE 8000

# Model loading takes a while on first start; the server drains on SIGTERM (30 s by default),
# which is why docker stop needs `-t 35` or more to let in-flight requests finish.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["itt-server", "--host", "0.0.0.0"]
CMD []
