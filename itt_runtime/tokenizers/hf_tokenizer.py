"""A Hugging Face ``tokenizer.json`` through the ``tokenizers`` library (Rust, fast).

Both kinds LLaMA-family models ship work: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM: "Ġ"
for a space, every byte a token) and sentencepiece-style BPE (Llama 2, Mistral, TinyLlama:
"▁" for a space, ``<0xNN>`` byte-fallback tokens). Added tokens (``<|im_start|>``…) are
recognised in text as ``tokenizers`` does; special ones are dropped by
``decode(skip_special_tokens=True)``.

Semantics follow transformers' ``PreTrainedTokenizerFast`` so that ids match what a model was
trained with:
- ``add_special_tokens`` runs the tokenizer.json post-processor, which adds BOS itself where
  the model wants one (so BOS is never added twice). ``add_bos_token`` in
  ``tokenizer_config.json``, where given, overrides it (as transformers' Llama tokenizer).
- BOS/EOS come from ``tokenizer_config.json`` (or ``special_tokens_map.json``); where it names
  no EOS the loader falls back to the model config's ``eos_token_id``.
- ``clean_up_tokenization_spaces`` is not applied: it rewrites " ." to "." after decoding,
  which would make streamed text differ from the tokens' text (vLLM does not apply it to
  streamed output either).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

from itt_runtime.tokenizers.tokenizer import Tokenizer, TokenizerError, read_json


@functools.cache
def byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (``"Ġ"`` for a space) -> the byte.

    Bytes that are printable on their own stand for themselves; the others (controls, space,
    a few Latin-1 ones) are given the code points from 256 up, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            alphabet[chr(256 + extra)] = b
            extra += 1
    return alphabet


def _component_types(node: Any) -> set[str]:
    """Every ``type`` in a tokenizer.json component, looking inside ``Sequence`` ones."""
    if isinstance(node, dict):
        found = {node["type"]} if isinstance(node.get("type"), str) else set()
        for key in ("decoders", "pretokenizers", "normalizers", "processors"):
            for child in node.get(key) or []:
                found |= _component_types(child)
        return found
    return set()


class HFTokenizer(Tokenizer):
    """A ``tokenizer.json``; ``config``: the model's tokenizer config
    (``read_tokenizer_config``), for BOS/EOS, ``add_bos_token`` and the chat template.
    ``backend``: a ``tokenizers.Tokenizer`` built in memory (from a GGUF vocabulary) instead of
    the file, which ``tokenizer_file`` then only names (in messages and ``path``)."""

    def __init__(self, tokenizer_file: str | Path, config: dict[str, Any] | None = None,
                 backend: Backend | None = None) -> None:
        super().__init__(tokenizer_file)
        file = self.path
        if backend is None:
            raw = read_json(file)
            try:
                backend = Backend.from_str(file.read_text(encoding="utf-8"))
            except Exception as e:     # noqa: BLE001 - the Rust library's errors are untyped
                first = str(e).strip().splitlines()[0] if str(e).strip() \
                    else type(e).__name__
                raise TokenizerError(f"{file}: not a Hugging Face tokenizer ({first})") \
                    from None
            where = file.parent / "tokenizer_config.json"
        else:
            raw = json.loads(backend.to_str())
            where = file
        self._tok = backend
        self.config = dict(config or {})
        self.chat_template = self.config.get("chat_template")
        decoder = _component_types(raw.get("decoder"))
        self._byte_level = "ByteLevel" in decoder
        self._byte_fallback = "ByteFallback" in decoder
        self._added = {i: t for i, t in self._tok.get_added_tokens_decoder().items()}
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values(), default=-1) + 1
        self.bos_token_id = self._config_token_id("bos_token", where)
        self.eos_token_id = self._config_token_id("eos_token", where)
        # What the post-processor puts around a text: BOS first or not.
        self._post_bos = self.bos_token_id >= 0 and \
            self._tok.encode("", add_special_tokens=True).ids[:1] == [self.bos_token_id]
        wants = self.config.get("add_bos_token")
        self._add_bos = wants if isinstance(wants, bool) and self.bos_token_id >= 0 \
            else self._post_bos

    def save(self, out_dir: Path) -> list[str]:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (with the chat template)
        into ``out_dir``, as a Hugging Face tokenizer directory; returns their names."""
        self._tok.save(str(out_dir / "tokenizer.json"))
        (out_dir / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        return ["tokenizer.json", "tokenizer_config.json"]

    def _config_token_id(self, field: str, where: Path) -> int:
        content = self.config_token(field)
        if content is None:
            return -1
        token_id = self._tok.token_to_id(content)
        if token_id is None:
            raise TokenizerError(f"{where}: {field} {content!r} is not in {self.path.name}")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        special = {i for i, t in self._added.items() if t.special}
        return frozenset(special | {i for i in (self.bos_token_id, self.eos_token_id) if i >= 0})

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos

    @property
    def kind(self) -> str:
        name = self.config.get("tokenizer_class")
        return name if isinstance(name, str) else "PreTrainedTokenizerFast"

    def id_to_piece(self, token_id: int) -> str:
        piece = self._tok.id_to_token(token_id)
        return piece if piece is not None else ""

    def token_bytes(self, token_id: int) -> bytes | None:
        added = self._added.get(token_id)
        if added is not None:
            return None if added.special else added.content.encode()
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return None
        if self._byte_level:
            alphabet = byte_level_alphabet()
            return bytes(alphabet[ch] for ch in piece) if all(ch in alphabet for ch in piece) \
                else piece.encode()
        if self._byte_fallback and len(piece) == 6 and piece.startswith("<0x") \
                and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._add_bos != self._post_bos:
            ids = [self.bos_token_id] + ids if self._add_bos else ids[1:]
        return ids

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        ids = self._encode(text, add_bos)
        if add_eos and self.eos_token_id >= 0 and ids[-1:] != [self.eos_token_id]:
            ids.append(self.eos_token_id)
        return ids

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._encode(text, add_special_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
