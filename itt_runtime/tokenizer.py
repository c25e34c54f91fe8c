"""SentencePiece tokenizer with BOS/EOS handling and incremental (streaming) detokenization."""

from __future__ import annotations

import functools
from pathlib import Path

import sentencepiece as spm


class Tokenizer:
    def __init__(self, model_file: str | Path) -> None:
        self.path = Path(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_token(self) -> str:
        return self.sp.id_to_piece(self.eos_token_id)

    @property
    def bos_token(self) -> str:
        return self.sp.id_to_piece(self.bos_token_id)

    @functools.cached_property
    def max_piece_chars(self) -> int:
        """The most characters one token can stand for (a byte piece: one)."""
        return max(1, max(len(self.sp.id_to_piece(i)) for i in range(self.vocab_size)))

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        if add_bos and self.bos_token_id >= 0:
            ids = [self.bos_token_id] + ids
        if add_eos and self.eos_token_id >= 0:
            ids = ids + [self.eos_token_id]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            special = {self.bos_token_id, self.eos_token_id}
            ids = [i for i in ids if i not in special]
        return self.sp.decode(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def incremental(self, prompt_ids: list[int] | None = None) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids or [])


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    SentencePiece decoding is not additive: a leading "▁" is dropped at the start of a string,
    and a multi-byte character split over byte-fallback tokens only decodes once complete. So
    we decode a short window of context tokens plus the new ones, subtract the context's
    text, and hold back output that ends in an incomplete character (U+FFFD).
    """

    CONTEXT = 6

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self.tok = tokenizer
        self.ids: list[int] = list(prompt_ids)
        self.prefix_offset = max(len(self.ids) - self.CONTEXT, 0)
        self.read_offset = len(self.ids)
        # A prompt that ends inside a multi-byte character: its trailing bytes belong to the
        # first character the generation completes, so they count as unread.
        while self.read_offset > 0 and tokenizer.decode(
                self.ids[self.prefix_offset:self.read_offset]).endswith("\ufffd"):
            self.read_offset -= 1
            self.prefix_offset = min(self.prefix_offset, max(self.read_offset - self.CONTEXT, 0))
        self.text = ""

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the newly completed text (possibly empty)."""
        self.ids.extend(token_ids)
        prefix_text = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self.tok.decode(self.ids[self.prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        delta = full_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += delta
        return delta
