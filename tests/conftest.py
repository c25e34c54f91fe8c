"""Shared fixtures: a small tokenizer and tiny ITT / dense models built from the committed
held-out slice, so that tests never need the shipped model unless they test it."""

from __future__ import annotations

import os

# Tiny models run fastest on one thread, and two-thread OpenMP spin-waits slow everything down
# a hundredfold when the cores are shared (CI, a training job). Servers started by tests
# inherit this through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import dataclasses  # noqa: E402
from pathlib import Path

import pytest
import torch

from itt_runtime.config import ModelConfig
from itt_runtime.model.itt import ITTModel
from itt_runtime.model.loader import save_model
from itt_runtime.tokenizer import Tokenizer
from itt_runtime.training.calibrate import calibrate
from itt_runtime.training.cli import train_tokenizer
from itt_runtime.training.trainer import encode_corpus, eval_windows, init_weights

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parent.parent
HELDOUT = REPO / "data" / "heldout.txt"


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer([HELDOUT], 512, out / "tok")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_file) -> Tokenizer:
    return Tokenizer(tokenizer_file)


def tiny_config(vocab_size: int, **overrides) -> ModelConfig:
    base = dict(vocab_size=vocab_size, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
                ffn_dim=128, max_position_embeddings=512, itt_layers=(1, 3), think_steps=3,
                train_capacity=0.5)
    base.update(overrides)
    return ModelConfig(**base)


def build_tiny_model(tokenizer_file: Path, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """A random-init tiny model with routers calibrated on the held-out slice, saved in fp32."""
    tok = Tokenizer(tokenizer_file)
    cfg = tiny_config(tok.vocab_size, **overrides)
    torch.manual_seed(seed)
    model = ITTModel(cfg)
    init_weights(model)
    with torch.no_grad():               # spread router logits so thresholds are meaningful
        for layer in model.layers:
            if layer.think_steps > 1:
                for r in layer.routers:
                    r.weight.normal_(std=0.5)
    if cfg.is_itt:
        windows = eval_windows(encode_corpus(tok, HELDOUT), 64, limit=32)[:, :-1]
        model.cfg = dataclasses.replace(cfg, calibration=calibrate(model, windows))
    return save_model(model, tokenizer_file, out_dir, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_file, tmp_path_factory) -> Path:
    return build_tiny_model(tokenizer_file, tmp_path_factory.mktemp("tiny_itt"))


@pytest.fixture(scope="session")
def tiny_dense_dir(tokenizer_file, tmp_path_factory) -> Path:
    return build_tiny_model(tokenizer_file, tmp_path_factory.mktemp("tiny_dense"),
                            itt_layers=(), think_steps=1)
