"""Structured outputs (constrained decoding) with xgrammar.

A ``GrammarSpec`` (JSON schema, any JSON, regex, choice or EBNF grammar) is compiled once per
distinct spec by ``GrammarCompiler`` — in the server, off the engine thread — into a
``CompiledGrammar`` that travels in ``SamplingParams.grammar``. Each sequence gets its own
matcher (its grammar state) the first time it samples; the sampler masks the row's logits with
the matcher's token bitmask, and ``append_token`` advances the matcher with the chosen token.
A grammar that completes (its stop token, EOS, accepted) ends the sequence with "stop".

Why xgrammar: see docs/server.md, "Structured outputs".
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from itt_runtime.tokenizers.tokenizer import Tokenizer

Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]


class GrammarError(ValueError):
    """A spec that does not compile; the server answers 400 naming the request field."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to. ``text``: the schema (JSON text), regex,
    choices (a JSON list of strings) or EBNF grammar; unused for ``json_object``."""
    kind: Kind
    text: str = ""


@dataclass(frozen=True, eq=False)
class CompiledGrammar:
    spec: GrammarSpec
    compiled: Any                    # xgrammar.CompiledGrammar
    # (V,) True for tokens never allowed: for JSON, those holding a raw control character,
    # which xgrammar's JSON strings let through but JSON (and json.loads) forbid.
    banned: torch.Tensor | None = None

    def matcher(self) -> Any:
        import xgrammar as xgr
        return xgr.GrammarMatcher(self.compiled)


class GrammarCompiler:
    """Compiles specs against one tokenizer, caching by spec. Thread-safe; building the
    tokenizer table (0.2 s for 8192 pieces, after importing xgrammar) happens on first use."""

    CACHE_SIZE = 256

    def __init__(self, tokenizer: Tokenizer, vocab_size: int,
                 stop_token_ids: Iterable[int] = ()) -> None:
        """``stop_token_ids``: every id that ends a sequence (Llama 3 has several); the
        grammar allows them once complete. Default: the tokenizer's EOS."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(set(stop_token_ids) or {tokenizer.eos_token_id})
        self._lock = threading.Lock()
        self._compiler: Any = None
        self._control: torch.Tensor | None = None
        self.compile = functools.lru_cache(self.CACHE_SIZE)(self._compile)

    def _xgr_compiler(self) -> Any:
        import xgrammar as xgr
        with self._lock:
            if self._compiler is None:
                tok = self.tokenizer
                # Each token as the raw bytes it adds to the text (any tokenizer kind: "▁"
                # and "Ġ" are a space, byte tokens their byte). Special tokens get b"" so
                # that no text matches them.
                vocab = [tok.token_bytes(i) or b"" for i in range(tok.vocab_size)]
                info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW,
                                         vocab_size=self.vocab_size,
                                         stop_token_ids=self.stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
                control = [any(b < 0x20 for b in raw) for raw in vocab]
                control += [False] * (self.vocab_size - len(control))   # embedding padding
                self._control = torch.tensor(control, dtype=torch.bool)
            return self._compiler

    def _compile(self, spec: GrammarSpec) -> CompiledGrammar:
        c = self._xgr_compiler()
        try:
            if spec.kind == "json_object":
                # OpenAI's JSON mode: any JSON object, written as schemas are. (xgrammar's
                # built-in JSON grammar allows free whitespace, and arrays.)
                compiled = c.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                 strict_mode=False)
            elif spec.kind == "json_schema":
                # One line with ", " and ": " (no free whitespace, which a small model can
                # fill forever); properties the schema does not name are not generated.
                compiled = c.compile_json_schema(spec.text, any_whitespace=False,
                                                 strict_mode=True)
            elif spec.kind == "regex":
                compiled = c.compile_regex(spec.text)
            elif spec.kind == "choice":
                compiled = c.compile_grammar(choice_grammar(json.loads(spec.text)))
            else:
                compiled = c.compile_grammar(spec.text)
        except Exception as e:     # noqa: BLE001 - any failure to compile is the spec's
            raise GrammarError(str(e).strip().splitlines()[0] if str(e).strip()
                               else type(e).__name__) from None
        json_kind = spec.kind in ("json_schema", "json_object")
        return CompiledGrammar(spec, compiled, self._control if json_kind else None)


def choice_grammar(choices: list[str]) -> str:
    """EBNF for exactly one of ``choices`` (JSON string literals are EBNF string literals).
    Non-ASCII characters stay as they are: escaped, a character outside the BMP would be a
    surrogate pair, which the grammar reads as two (invalid) characters."""
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise GrammarError("choices must be a non-empty list of non-empty strings")
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def next_token_bitmasks(seqs: list, vocab_size: int) -> torch.Tensor:
    """(len(seqs), ceil(V/32)) int32: the tokens each sequence's grammar allows next. Host
    work only, so the runner computes it on a worker thread while the model step runs.
    Creates a sequence's matcher on its first call."""
    import xgrammar as xgr
    bitmask = xgr.allocate_token_bitmask(len(seqs), vocab_size)
    for j, seq in enumerate(seqs):
        if seq.grammar_matcher is None:
            seq.grammar_matcher = seq.params.grammar.matcher()
        seq.grammar_matcher.fill_next_token_bitmask(bitmask, j)
    return bitmask


def apply_grammars(logits: torch.Tensor, seqs: list, rows: list[int],
                   bitmask: torch.Tensor | None = None) -> None:
    """Mask ``logits`` (N, V) in place: row ``rows[j]`` keeps only the tokens that
    ``seqs[j]``'s grammar allows next (``bitmask``: their masks, computed ahead)."""
    import xgrammar as xgr
    if bitmask is None:
        bitmask = next_token_bitmasks(seqs, logits.shape[1])
    full = xgr.allocate_token_bitmask(len(logits), logits.shape[1])   # (N, ceil(V/32))
    full[rows] = bitmask
    xgr.apply_token_bitmask_inplace(logits, full.to(logits.device, non_blocking=True),
                                    indices=rows)
    for seq, row in zip(seqs, rows):
        banned = seq.params.grammar.banned
        if banned is not None:
            logits[row].masked_fill_(banned.to(logits.device, non_blocking=True), -float("inf"))


def accept(seq: Any, token: int) -> bool:
    """Advance ``seq``'s grammar with ``token``; True when the grammar has completed."""
    matcher = seq.grammar_matcher
    if not matcher.accept_token(token):
        raise RuntimeError(f"token {token} is not allowed by the request's grammar")
    return bool(matcher.is_terminated())
