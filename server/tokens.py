"""Text ↔ token helpers for the HTTP layer: prompt encoding and the per-token strings that
logprob tables show."""

from __future__ import annotations

from itt_runtime.tokenizers.tokenizer import Tokenizer
from server.errors import bad_request

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
    """Encode a request's text as Hugging Face tokenizers do: literal special tokens
    (``<s>``, ``</s>``, ``<|im_start|>``) become those tokens (lm-evaluation-harness finds the
    EOS id by tokenizing ``eos_token``); ``add_special_tokens`` adds BOS where the tokenizer
    does. See ``Tokenizer.encode_prompt``."""
    return tok.encode_prompt(text, add_special_tokens)


def piece_text(tok: Tokenizer, token_id: int) -> str:
    """A token's text on its own (``Tokenizer.token_text``): ``▁``/``Ġ`` is a space, byte
    tokens are their character when whole, else their piece (``<0xE3>``)."""
    return tok.token_text(token_id)


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
