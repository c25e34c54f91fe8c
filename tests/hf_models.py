"""Tiny random Hugging Face checkpoints (Llama, Qwen2, Mistral) saved by transformers itself, for
the tests that check itt-server reads them as transformers does.

Import as ``from hf_models import …`` (tests/ is on sys.path through tests/conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from hf_tokenizers import LLAMA3, write_byte_level_tokenizer
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM)}

# Llama 3.1's scaling, with the original context shrunk so that tiny prompts reach the scaled
# and the blended frequencies.
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def tiny_config(family: str = "llama", *, vocab_size: int = 512, tied: bool = False,
                gqa: bool = True, rope_scaling: dict | None = None, **overrides):
    """A 2-layer config: d 64, 4 heads (2 KV heads with ``gqa``), head_dim 16, 256 positions."""
    config_cls, _ = FAMILIES[family]
    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2 if gqa else 4, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    if family == "mistral":
        kwargs["sliding_window"] = None
    if rope_scaling is not None:
        kwargs["rope_scaling"] = {**rope_scaling, "rope_theta": 10000.0}
    kwargs.update(overrides)
    return config_cls(**kwargs)


def randomize(model: PreTrainedModel, seed: int) -> None:
    """Every weight random and non-trivial (transformers starts norms at 1 and biases at 0,
    which would hide a norm or bias the reader dropped)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.08 * noise)


def build_hf_model(out: Path, family: str = "llama", *, tokenizer_file: Path | None = None,
                   max_shard_size: str | None = None, seed: int = 0,
                   generation: dict | None = None, **config_kwargs) -> Path:
    """Save a random tiny model with ``save_pretrained`` into ``out`` (sharded when
    ``max_shard_size`` is given, e.g. "60KB"); copy ``tokenizer_file`` in as
    tokenizer.model; ``generation``: extra generation_config.json fields."""
    _, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(tiny_config(family, **config_kwargs)).float().eval()
    randomize(model, seed)
    if generation:
        for k, v in generation.items():
            setattr(model.generation_config, k, v)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **kwargs)
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, out / "tokenizer.model")
    return out


def build_hf_chat_model(out: Path, chat_template: str = LLAMA3, **config_kwargs) -> Path:
    """A tiny random Llama directory that a Hugging Face client can load whole: the byte-level
    ``tokenizer.json`` of ``hf_tokenizers`` (511 learned + 1 added token = the model's 512
    rows; BOS 0 and EOS 1 as the tokenizer's) with ``chat_template`` in its
    tokenizer_config.json."""
    build_hf_model(out, vocab_size=512, bos_token_id=0, eos_token_id=1, **config_kwargs)
    return write_byte_level_tokenizer(out, 511, chat_template=chat_template)


def load_hf(path: Path) -> PreTrainedModel:
    """The transformers model of a directory, fp32, eager attention (the reference)."""
    family = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
              "MistralForCausalLM": "mistral"}
    import json
    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    _, model_cls = FAMILIES[family[arch]]
    return model_cls.from_pretrained(path, dtype=torch.float32,
                                     attn_implementation="eager").eval()


@torch.no_grad()
def hf_logits(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    """(T, vocab) fp32 logits of one sequence."""
    return model(torch.tensor([ids])).logits[0].float()
