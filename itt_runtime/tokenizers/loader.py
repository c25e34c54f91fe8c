"""A model directory's tokenizer: ``tokenizer.json`` (Hugging Face) or ``tokenizer.model``
(sentencepiece), with the ``tokenizer_config.json`` beside it."""

from __future__ import annotations

from pathlib import Path

from itt_runtime.checkpoints import resolve_model_path
from itt_runtime.config import CheckpointError, ModelConfig
from itt_runtime.tokenizers.hf_tokenizer import HFTokenizer
from itt_runtime.tokenizers.tokenizer import (
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    read_tokenizer_config,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")    # either; tokenizer.json wins


def load_tokenizer(path: str | Path | None, cfg: ModelConfig | None = None) -> Tokenizer:
    """The model directory's tokenizer: ``tokenizer.json`` (Hugging Face ``tokenizers``) when
    present, else ``tokenizer.model`` (sentencepiece); with ``tokenizer_config.json`` (the chat
    template; for tokenizer.json also BOS/EOS) where there is one. ``cfg``: the model's config,
    whose embedding must have a row for every token, and whose ``eos_token_id`` stands in
    where the tokenizer config names no EOS."""
    path = resolve_model_path(path)
    try:
        config = read_tokenizer_config(path)
        tok: Tokenizer
        if (path / "tokenizer.json").is_file():
            tok = HFTokenizer(path / "tokenizer.json", config)
        else:
            try:
                tok = SentencePieceTokenizer(path / "tokenizer.model")
            except (OSError, RuntimeError) as e:
                raise CheckpointError(f"{path / 'tokenizer.model'}: not a sentencepiece model "
                                      f"({e})") from None
            tok.config, tok.chat_template = config, config["chat_template"]
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    if cfg is not None and tok.eos_token_id < 0 and isinstance(cfg.eos_token_id, int):
        tok.eos_token_id = cfg.eos_token_id
    if cfg is not None and tok.vocab_size > cfg.vocab_size:
        name = "tokenizer.json" if isinstance(tok, HFTokenizer) else "tokenizer.model"
        raise CheckpointError(f"{name} has {tok.vocab_size} pieces but config.json "
                              f"'vocab_size' is {cfg.vocab_size}")
    return tok
