"""Text ↔ token helpers for the HTTP layer: prompt encoding and the per-token strings that
logprob tables show."""

from __future__ import annotations

import re

from itt_runtime.tokenizer import Tokenizer
from server.errors import bad_request

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


# Normalisation (NFKC) can merge a few characters into one before pieces are matched.
_NORMALISATION_SLACK = 4


def check_size(tok: Tokenizer, text: str, max_model_len: int, param: str) -> None:
    """400 for text that could never fit in the context, before spending CPU on encoding it:
    every token covers at most ``max_piece_chars`` characters (times the normalisation
    slack), so longer text has more than ``max_model_len`` tokens for sure."""
    limit = max_model_len * tok.max_piece_chars * _NORMALISATION_SLACK
    if len(text) > limit:
        raise bad_request(f"{param} has {len(text)} characters, more than the {max_model_len}"
                          f"-token context of this model could hold (at most {limit})", param)


def encode(tok: Tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """Encode text; the literal strings of the BOS and EOS tokens (``<s>``, ``</s>``) become
    those tokens, as Hugging Face tokenizers do (lm-evaluation-harness finds the EOS id by
    tokenizing ``eos_token``). ``add_special_tokens`` prepends BOS."""
    specials = {tok.bos_token: tok.bos_token_id, tok.eos_token: tok.eos_token_id}
    specials = {s: i for s, i in specials.items() if i is not None and i >= 0 and s}
    ids = [tok.bos_token_id] if add_special_tokens and tok.bos_token_id >= 0 else []
    if not specials:
        return ids + tok.encode(text, add_bos=False)
    pattern = "(" + "|".join(re.escape(s) for s in specials) + ")"
    for part in re.split(pattern, text):
        if part in specials:
            ids.append(specials[part])
        elif part:
            ids.extend(tok.encode(part, add_bos=False))
    return ids


def piece_text(tok: Tokenizer, token_id: int) -> str:
    """A token's text on its own: ``▁`` is a space, byte pieces are their byte (when ASCII)."""
    piece = tok.id_to_piece(token_id)
    m = _BYTE_PIECE.match(piece)
    if m:
        b = int(m.group(1), 16)
        return chr(b) if b < 0x80 else piece
    return piece.replace("\u2581", " ")


class TokenTexts:
    """The text each token of a growing sequence adds to the decoded string.

    Uses the same incremental detokenizer as the engine, so the pieces concatenate to the
    response text (a token that only completes a multi-byte character gets the whole
    character; the ones before it get "").
    """

    def __init__(self, tok: Tokenizer, context: list[int] | None = None) -> None:
        self._detok = tok.incremental(list(context or []))

    def add(self, token_ids: list[int]) -> list[str]:
        return [self._detok.add([t]) for t in token_ids]
