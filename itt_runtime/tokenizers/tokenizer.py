"""Tokenizers: one small interface (``Tokenizer``), two implementations, and incremental
(streaming) detokenization that works for both.

- ``SentencePieceTokenizer``: a ``tokenizer.model`` (this project's own models).
- ``HFTokenizer`` (``itt_runtime/tokenizers/hf_tokenizer.py``): a Hugging Face ``tokenizer.json``
  (Llama 3, SmolLM, Qwen, Mistral…), byte-level BPE or sentencepiece-style.

``itt_runtime.tokenizers.loader.load_tokenizer(DIR)`` picks one: ``tokenizer.json`` when present,
else ``tokenizer.model``. Either may have a ``tokenizer_config.json`` beside it, which holds
the chat template (see ``read_tokenizer_config``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sentencepiece as spm

from itt_runtime.config import read_json_object

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenizerError(ValueError):
    """A tokenizer file or its config is unreadable or inconsistent (the message names it)."""


class Tokenizer:
    """What the engine and the server need from a tokenizer.

    Ids that a tokenizer does not have (no BOS, as Qwen) are -1, and their tokens ``None``.
    ``chat_template`` is the model's Jinja chat template (None: the model has none);
    ``config`` the raw ``tokenizer_config.json`` ({} without one).

    ``Tokenizer(path)`` still builds a ``SentencePieceTokenizer`` (what it was before there
    were two kinds), so that existing callers keep working.
    """

    path: Path
    bos_token_id: int = -1
    eos_token_id: int = -1
    chat_template: str | None = None
    config: dict[str, Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> Tokenizer:
        if cls is Tokenizer:
            cls = SentencePieceTokenizer
        return super().__new__(cls)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = {}

    # ---- vocabulary -----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Token ids are in ``[0, vocab_size)`` (added tokens included)."""
        raise NotImplementedError

    @property
    def bos_token(self) -> str | None:
        return self.id_to_piece(self.bos_token_id) if self.bos_token_id >= 0 else None

    @property
    def eos_token(self) -> str | None:
        return self.id_to_piece(self.eos_token_id) if self.eos_token_id >= 0 else None

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special (control) tokens: dropped by ``skip_special_tokens``."""
        raise NotImplementedError

    def config_token(self, name: str) -> str | None:
        """A special token ``tokenizer_config.json`` names (``pad_token``, ``unk_token``, …):
        its text, given there as a string or an AddedToken object; None if it names none."""
        value = self.config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) else None

    @property
    def add_bos_token(self) -> bool:
        """Whether ``encode(..., add_bos=True)`` puts a BOS first."""
        raise NotImplementedError

    @property
    def kind(self) -> str:
        """A short name for ``/tokenizer_info``'s ``tokenizer_class``."""
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        """The token's vocabulary entry as stored (``▁the``, ``Ġthe``, ``<0xE3>``, ``<s>``)."""
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes the token adds to decoded text (a byte piece: its one byte; ``▁``: a
        space); None for special tokens, which stand for no text."""
        raise NotImplementedError

    def token_text(self, token_id: int) -> str:
        """A token's text on its own, for logprob tables: its bytes when they are whole
        characters, else its piece (``<0xE3>``); a special token's piece."""
        raw = self.token_bytes(token_id)
        if raw is None:
            return self.id_to_piece(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return self.id_to_piece(token_id)

    @functools.cached_property
    def max_piece_chars(self) -> int:
        """The most characters one token can stand for (bounds text length from tokens)."""
        return max(1, max(len(self.id_to_piece(i)) for i in range(self.vocab_size)))

    # ---- text <-> ids ---------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` (training data, ``LLM.generate`` prompts)."""
        raise NotImplementedError

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """A request's text as the server encodes it, as Hugging Face tokenizers do: literal
        special tokens (``<s>``, ``<|im_start|>``) in the text become those tokens, and
        ``add_special_tokens`` adds what the tokenizer adds around a text (BOS)."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def incremental(self, prompt_ids: list[int] | None = None,
                    skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids or [], skip_special_tokens)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``tokenizer.model`` (BPE with byte fallback, as ``itt-train`` makes)."""

    def __init__(self, model_file: str | Path) -> None:
        super().__init__(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        return frozenset(i for i in range(self.vocab_size) if self.sp.is_control(i))

    @property
    def add_bos_token(self) -> bool:
        return self.bos_token_id >= 0

    @property
    def kind(self) -> str:
        return "SentencePieceTokenizer"

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def token_bytes(self, token_id: int) -> bytes | None:
        if self.sp.is_control(token_id) or self.sp.is_unknown(token_id):
            return None
        piece = self.sp.id_to_piece(token_id)
        if self.sp.is_byte(token_id):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    def token_text(self, token_id: int) -> str:
        """``▁`` is a space, byte pieces are their byte (when ASCII)."""
        piece = self.sp.id_to_piece(token_id)
        m = _BYTE_PIECE.match(piece)
        if m:
            b = int(m.group(1), 16)
            return chr(b) if b < 0x80 else piece
        return piece.replace("\u2581", " ")

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        if add_bos and self.bos_token_id >= 0:
            ids = [self.bos_token_id] + ids
        if add_eos and self.eos_token_id >= 0:
            ids = ids + [self.eos_token_id]
        return ids

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # sentencepiece would split "<s>" into characters; lm-evaluation-harness finds the
        # EOS id by tokenizing ``eos_token``, so the literal strings become the tokens.
        specials = {self.bos_token: self.bos_token_id, self.eos_token: self.eos_token_id}
        found = {s: i for s, i in specials.items() if s and i >= 0}
        ids = [self.bos_token_id] if add_special_tokens and self.bos_token_id >= 0 else []
        if not found:
            return ids + self.encode(text, add_bos=False)
        pattern = "(" + "|".join(re.escape(s) for s in found) + ")"
        for part in re.split(pattern, text):
            if part in found:
                ids.append(found[part])
            elif part:
                ids.extend(self.encode(part, add_bos=False))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        if skip_special_tokens:
            special = {self.bos_token_id, self.eos_token_id}
            ids = [i for i in ids if i not in special]
        return self.sp.decode(ids)


def read_json(file: Path) -> dict[str, Any]:
    """A JSON object file; ``TokenizerError`` naming the file if it is not one."""
    return read_json_object(file, TokenizerError)


def read_tokenizer_config(model_dir: Path) -> dict[str, Any]:
    """``tokenizer_config.json`` ({} if absent; ``special_tokens_map.json`` fills in the
    tokens it does not name), with ``chat_template`` resolved to one string
    or None: a ``chat_template.jinja`` file wins (newer transformers save it there); the
    list-of-named-templates form gives its ``default`` template (as transformers does when
    no tools are asked for)."""
    file = model_dir / "tokenizer_config.json"
    cfg = read_json(file) if file.is_file() else {}
    special_map = model_dir / "special_tokens_map.json"
    if special_map.is_file():          # older checkpoints name BOS/EOS only there
        for key, value in read_json(special_map).items():
            cfg.setdefault(key, value)
    template: Any = cfg.get("chat_template")
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            template = jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{jinja_file}: unreadable ({e})") from None
    elif isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise TokenizerError(f"{file}: 'chat_template' is a list of named templates "
                                 f"without a 'default' one (has {sorted(map(str, named))})")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{file}: 'chat_template' must be a string or a list of "
                             "{name, template} objects")
    cfg["chat_template"] = template
    return cfg


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decoding is not additive: sentencepiece drops a leading "▁" at the start of a string, and
    a multi-byte character split over byte tokens (byte fallback, or byte-level BPE) only
    decodes once complete. So we decode a short window of context tokens plus the new ones,
    subtract the context's text, and hold back output that ends in an incomplete character
    (U+FFFD).
    """

    CONTEXT = 6

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int],
                 skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)
        self.read_offset = len(self.ids)
        # The context window must not start inside a character: byte fallback decodes a run
        # of byte tokens that is not valid UTF-8 to U+FFFD throughout, complete characters
        # after the broken one included.
        self.prefix_offset = max(len(self.ids) - self.CONTEXT, 0)
        while self.prefix_offset > 0 and self._continues(self.ids[self.prefix_offset]):
            self.prefix_offset -= 1
        # A prompt that ends inside a multi-byte character: its trailing bytes belong to the
        # first character the generation completes, so they count as unread.
        while self.read_offset > self.prefix_offset and self._decode(
                self.prefix_offset, self.read_offset).endswith("\ufffd"):
            self.read_offset -= 1
        self.text = ""

    def _decode(self, start: int, end: int) -> str:
        return self.tok.decode(self.ids[start:end], self.skip_special_tokens)

    def _continues(self, token_id: int) -> bool:
        """Whether the token starts with a UTF-8 continuation byte (inside a character)."""
        raw = self.tok.token_bytes(token_id)
        return raw is not None and len(raw) > 0 and 0x80 <= raw[0] < 0xC0

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the newly completed text (possibly empty)."""
        self.ids.extend(token_ids)
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        full_text = self._decode(self.prefix_offset, len(self.ids))
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        delta = full_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += delta
        return delta
