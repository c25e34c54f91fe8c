"""A model directory's tokenizer: ``tokenizer.json`` (Hugging Face) or ``tokenizer.model``
(sentencepiece), with the ``tokenizer_config.json`` beside it; or the vocabulary of a GGUF file
(``gguf_vocab.py``)."""

from __future__ import annotations

from pathlib import Path

from itt_runtime.checkpoints import resolve_model_path
from itt_runtime.config import CheckpointError, ModelConfig
from itt_runtime.model import gguf
from itt_runtime.tokenizers.gguf_vocab import gguf_tokenizer
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
    template; for tokenizer.json also BOS/EOS) where there is one. A GGUF file gives the
    tokenizer its metadata describes. ``cfg``: the model's config, whose embedding must have a
    row for every token, and whose ``eos_token_id`` stands in where the tokenizer config names
    no EOS."""
    path = resolve_model_path(path)
    if gguf.is_gguf(path):
        ck = gguf.open_gguf(path)
        try:
            return check_vocabulary(gguf_tokenizer(ck.metadata, path), cfg, path.name,
                                    gguf.ROWS)
        except TokenizerError as e:
            raise CheckpointError(str(e)) from None
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{str(path)!r} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")
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
    name = "tokenizer.json" if isinstance(tok, HFTokenizer) else "tokenizer.model"
    return check_vocabulary(tok, cfg, name)


def check_vocabulary(tok: Tokenizer, cfg: ModelConfig | None, name: str,
                     rows: str = "config.json 'vocab_size'") -> Tokenizer:
    """``tok``, once it fits the model of ``cfg`` (every token has an embedding row), with
    the config's EOS where the tokenizer names none; ``name``: the tokenizer's file, ``rows``
    what states the model's vocabulary size (for the message)."""
    if cfg is not None and tok.eos_token_id < 0 and isinstance(cfg.eos_token_id, int):
        tok.eos_token_id = cfg.eos_token_id
    if cfg is not None and tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{name} has {tok.vocab_size} pieces but {rows} is "
                              f"{cfg.vocab_size}")
    return tok
