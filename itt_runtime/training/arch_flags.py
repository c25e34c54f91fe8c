"""itt-train's shape flags (``--d-model``, ``--itt-layers``, …): their defaults, the model they
describe, and the flags that disagree with an ``--init`` checkpoint."""

from __future__ import annotations

import argparse

from itt_runtime.config import ConfigError, ModelConfig
from itt_runtime.model.loader import LoadedModel, load_checkpoint
from itt_runtime.tokenizers.tokenizer import Tokenizer
from itt_runtime.training.upcycle import parse_itt_layers

# Shape flags: their defaults (a fresh model); with --init the checkpoint decides instead.
ARCH_DEFAULTS = {"vocab_size": 8192, "d_model": 256, "n_layers": 8, "n_heads": 8,
                 "n_kv_heads": 4, "ffn_dim": 688, "max_positions": 1024, "itt_layers": "odd",
                 "think_steps": 4, "train_capacity": 0.6}


def model_config(a: argparse.Namespace, tok: Tokenizer) -> ModelConfig:
    """The model the shape flags describe (``--itt-layers``: odd, none, or a list)."""
    itt_layers = parse_itt_layers(a.itt_layers, a.n_layers)
    return ModelConfig(vocab_size=tok.vocab_size, d_model=a.d_model, n_layers=a.n_layers,
                       n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, ffn_dim=a.ffn_dim,
                       max_position_embeddings=a.max_positions, itt_layers=itt_layers,
                       think_steps=a.think_steps if itt_layers else 1,
                       train_capacity=a.train_capacity,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def init_conflicts(a: argparse.Namespace, cfg: ModelConfig) -> list[str]:
    """Shape flags given on the command line that disagree with the --init checkpoint."""
    have: dict[str, object] = {
            "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
            "n_kv_heads": cfg.n_kv_heads, "ffn_dim": cfg.ffn_dim,
            "max_positions": cfg.max_position_embeddings, "vocab_size": cfg.vocab_size,
            "itt_layers": cfg.itt_layers, "think_steps": cfg.think_steps,
            "train_capacity": cfg.train_capacity}
    out = []
    for name, given in a.arch_given.items():
        want = parse_itt_layers(given, cfg.n_layers) if name == "itt_layers" else given
        if name in ("think_steps", "train_capacity") and not cfg.is_itt:
            continue                                 # meaningless for a dense model
        if want != have[name]:
            out.append(f"--{name.replace('_', '-')} {given} (the checkpoint has "
                       f"{list(cfg.itt_layers) if name == 'itt_layers' else have[name]})")
    return out


def load_init(a: argparse.Namespace) -> LoadedModel:
    """The ``--init`` checkpoint (a model directory or a GGUF file), or ValueError naming
    what is wrong: unreadable, or shape flags / ``--tokenizer`` that contradict it."""
    try:
        loaded = load_checkpoint(a.init)
    except ConfigError as e:
        raise ValueError(f"--init: {e}") from None
    conflicts = init_conflicts(a, loaded.model.cfg)
    if a.tokenizer is not None:
        conflicts.append(f"--tokenizer {a.tokenizer} (the checkpoint has its own)")
    if conflicts:
        raise ValueError(f"--init {a.init} fixes the architecture and tokenizer; drop "
                         f"{'; '.join(conflicts)} (itt-upcycle makes ITT layers)")
    return loaded
