"""Text → token streams and evaluation windows: shared by the trainer, itt-eval and itt-bench
(the serving side never imports the trainer)."""

from __future__ import annotations

from pathlib import Path

import torch

from itt_runtime.tokenizers.tokenizer import Tokenizer


def encode_documents(tok: Tokenizer, text: str) -> list[int]:
    """One document per line -> one long stream: BOS doc EOS BOS doc EOS ..."""
    ids: list[int] = []
    for line in text.splitlines():
        if line.strip():
            ids.extend(tok.encode(line, add_bos=True, add_eos=True))
    return ids


def encode_corpus(tok: Tokenizer, path: Path) -> torch.Tensor:
    return torch.tensor(encode_documents(tok, path.read_text(encoding="utf-8")),
                        dtype=torch.int32)


def eval_windows(stream: torch.Tensor, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (N, seq_len + 1) covering the held-out stream."""
    n = (stream.numel() - 1) // seq_len
    if limit:
        n = min(n, limit)
    return torch.stack([stream[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)]).long()
