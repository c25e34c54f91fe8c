"""Shared fixtures: a small tokenizer and tiny ITT / dense models built from the committed
held-out slice, so that tests never need the shipped model unless they test it."""

from __future__ import annotations

import os

# Tiny models run fastest on one thread, and two-thread OpenMP spin-waits slow everything down
# a hundredfold when the cores are shared (CI, a training job). Servers started by tests
# inherit this through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from itt_testing import HELDOUT, build_tiny_model  # noqa: E402,F401

from itt_runtime.tokenizers.tokenizer import Tokenizer  # noqa: E402
from itt_runtime.training.cli import train_tokenizer  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer([HELDOUT], 512, out / "tok")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_file) -> Tokenizer:
    return Tokenizer(tokenizer_file)


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_file, tmp_path_factory) -> Path:
    return build_tiny_model(tokenizer_file, tmp_path_factory.mktemp("tiny_itt"))


@pytest.fixture(scope="session")
def small_model_dir(tokenizer_file, tmp_path_factory) -> Path:
    """Two layers, one ITT ×2: the smallest graph with a routed step (compiles fastest)."""
    return build_tiny_model(tokenizer_file, tmp_path_factory.mktemp("tiny_2l"), n_layers=2,
                            itt_layers=(1,), think_steps=2)


@pytest.fixture(scope="session")
def tiny_dense_dir(tokenizer_file, tmp_path_factory) -> Path:
    return build_tiny_model(tokenizer_file, tmp_path_factory.mktemp("tiny_dense"),
                            itt_layers=(), think_steps=1)
