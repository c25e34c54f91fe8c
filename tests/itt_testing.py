"""Helpers shared by the test packages: paths and tiny model builders.

Import as ``from itt_testing import …`` (tests/ is on sys.path through tests/conftest.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from itt_runtime.config import ModelConfig
from itt_runtime.model.itt import ITTModel, ThresholdRouting
from itt_runtime.model.loader import save_model
from itt_runtime.tokenizers.tokenizer import Tokenizer
from itt_runtime.training.calibrate import calibrate
from itt_runtime.training.data import encode_corpus, eval_windows
from itt_runtime.training.trainer import init_weights

REPO = Path(__file__).resolve().parent.parent
HELDOUT = REPO / "data" / "heldout.txt"


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


@torch.no_grad()
def reference_greedy(model, ids, budget, n):
    """Greedy decode by recomputing the full sequence (no cache). Returns (tokens, extra
    steps of the position that produced each token, logits of each step)."""
    ids, extra, logits = list(ids), [], []
    for _ in range(n):
        out = model(torch.tensor([ids]), routing=ThresholdRouting.for_budgets(model.cfg, [budget]))
        logits.append(out.logits[0, -1])
        ids.append(int(out.logits[0, -1].argmax()))
        extra.append(int(out.routed[0, -1].sum()))
    return ids[-n:], extra, logits


def next_token_slots(engine, budgets: list[float]) -> set[int]:
    """The cache slots the next decode step writes for requests "0", "1", … (request k runs
    at ``budgets[k]``, 0 or 1): each stream's next position, on every stream at budget 1 and
    the base streams only at budget 0."""
    bs, n_layers = engine.config.block_size, engine.model_config.n_layers
    slots = set()
    for k, b in enumerate(budgets):
        kv = engine.kv.get(str(k))
        streams = range(len(kv.lengths) if b == 1.0 else n_layers)
        slots |= {kv.block_tables[s][kv.lengths[s] // bs] * bs + kv.lengths[s] % bs
                  for s in streams}
    return slots


def slots_written(engine, before: torch.Tensor) -> set[int]:
    """Slots of the K cache that differ from ``before`` (a clone), scratch block excluded."""
    changed = (engine.cache.k != before).flatten(2).any(-1).flatten().nonzero()[:, 0].tolist()
    scratch = range(engine.cache.scratch_slot,
                    engine.cache.scratch_slot + engine.config.block_size)
    return {s for s in changed if s not in scratch}
