# syntax=docker/dockerfile:1
# itt-server: an OpenAI-compatible server for Inner Thinking Transformer models.
#
#   docker build -t itt-server .                                  # CUDA (default)
#   docker build --build-arg VARIANT=cpu -t itt-server:cpu .      # CPU only, no CUDA libraries
#   docker run --gpus all -p 8000:8000 itt-server [itt-server flags, e.g. --default-think-budget 0.5]
#
# The install step is the README's: scripts/install.sh, which the test suite's own set-up
# (scripts/test.sh) runs too; tests/deploy/test_dockerfile.py keeps it that way.

ARG VARIANT=cuda
ARG TORCH_VERSION=2.13.0

# The CUDA base already ships torch with CUDA and cuDNN, so install.sh keeps it.
FROM pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime AS base-cuda

# A slim Python that gets the CPU-only torch: an image about a tenth of the CUDA one. With
# PyTorch's CPU index as an extra index, install.sh's `pip install torch==X` resolves to X+cpu
# (a local version sorts above the plain one) instead of PyPI's CUDA-bundled wheel.
FROM python:3.11-slim AS base-cpu
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# A C++ compiler: on CPU the server compiles its decode steps (AOTInductor, in a background
# process) and runs about twice as fast once they are ready; without one they stay eager.
# Mount /home/itt/.cache as a volume to keep the compiled steps across restarts.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# base-${VARIANT} names one of the two stages above, not a registry image.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG TORCH_VERSION
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# The README's install. .dockerignore admits only what it needs, including the default model
# (package data under itt_runtime/checkpoints/default), so the image serves with no arguments.
WORKDIR /opt/itt-server
COPY . .
RUN TORCH_VERSION="${TORCH_VERSION}" bash scripts/install.sh \
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
