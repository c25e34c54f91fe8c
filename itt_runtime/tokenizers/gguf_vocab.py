"""The tokenizer a GGUF file describes, built as a ``tokenizers`` object and served through
``HFTokenizer`` like a ``tokenizer.json``.

A GGUF has no tokenizer.json: it stores the vocabulary (``tokenizer.ggml.tokens``, with a type
per token), the BPE merges or per-token scores, the special token ids, and the name of the
pre-tokenizer llama.cpp applies (``tokenizer.ggml.pre``). Two tokenizer models are built:

- ``gpt2``: byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM). The pre-tokenizer is the list of
  regular expressions llama.cpp uses for ``tokenizer.ggml.pre`` (llama-vocab.cpp), each
  splitting the pieces of the one before and keeping what it does not match (llama.cpp's
  ``unicode_regex_split``, which is ``Split(..., "isolated")``), then the byte-to-character
  map. A ``pre`` we do not know is refused by name (pass ``--tokenizer DIR``): splitting
  differently would give other ids than the model was trained on. llama.cpp's Llama 3
  tokenizer looks a whole pre-token up before merging (``ignore_merges``), and so does this.
- ``llama``: sentencepiece-style BPE ("▁" for a space, ``<0xNN>`` byte fallback). GGUF keeps
  each piece's score rather than merges; the merges are derived from them as sentencepiece
  merges (the adjacent pair whose joined piece scores highest first), as transformers'
  converter does. A space is prepended to each stretch of text between special tokens (when
  ``tokenizer.ggml.add_space_prefix`` is true, the default), as llama.cpp does and as Llama 2's
  own tokenizer.json does (``Prepend`` normaliser).

Token types (sentencepiece's numbering): CONTROL tokens (``<|im_start|>``, ``<s>``) become
special added tokens, matched whole in text and dropped by ``skip_special_tokens``;
USER_DEFINED ones added tokens that are not special; UNKNOWN the BPE's unknown token. BOS/EOS/
UNK/PAD come from ``tokenizer.ggml.*_token_id``, ``add_bos_token`` from the file (default: on
for ``llama`` models and for llama.cpp's Llama 3 pre-tokenizer, as llama.cpp), the chat
template from ``tokenizer.chat_template``. The result can be saved as tokenizer.json +
tokenizer_config.json (``HFTokenizer.save``), which is how itt-upcycle keeps it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers import Tokenizer as Backend

from itt_runtime.tokenizers.hf_tokenizer import HFTokenizer
from itt_runtime.tokenizers.tokenizer import TokenizerError

Fail = Callable[[str], TokenizerError]
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp's pre-tokenizer regular expressions (llama-vocab.cpp), by ``tokenizer.ggml.pre``.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*" \
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*" \
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_NAMES = ("llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe")
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    # What llama.cpp does for a BPE vocabulary without a known pre-tokenizer (older files).
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    **{name: (_GPT2,) for name in ("gpt-2", "mpt", "olmo", "jais")},
    **{name: (r"\p{N}", _GPT2) for name in ("smollm", "starcoder", "refact", "command-r",
                                            "codeshell", "exaone", "minerva-7b")},
    **{name: (_LLAMA3,) for name in _LLAMA3_NAMES},
    **{name: (_QWEN2,) for name in ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez")},
}


def gguf_tokenizer(meta: Mapping[str, Any], path: Path) -> HFTokenizer:
    """The tokenizer of a GGUF file's metadata (``GGUFCheckpoint.metadata``); ``path``: the
    file, for messages. ``TokenizerError`` for a vocabulary that cannot be built exactly."""
    def fail(msg: str) -> TokenizerError:
        return TokenizerError(f"{path}: {msg}; pass --tokenizer DIR (a Hugging Face "
                              "tokenizer) to use another")

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or not isinstance(tokens, list) or not tokens:
        raise fail("has no vocabulary ('tokenizer.ggml.model' and 'tokenizer.ggml.tokens')")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise fail(f"'tokenizer.ggml.token_type' has {len(types)} entries for "
                   f"{len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if vocab.setdefault(t, i) != i:
            raise fail(f"the vocabulary has token {t!r} twice (ids {vocab[t]} and {i})")

    def special_id(name: str) -> int | None:
        v = meta.get(f"tokenizer.ggml.{name}_token_id")
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < len(tokens):
            raise fail(f"'tokenizer.ggml.{name}_token_id' {v!r} is not a token id")
        return v

    ids = {name: special_id(name) for name in ("bos", "eos", "unknown", "padding")}
    pre = meta.get("tokenizer.ggml.pre", "default")
    if kind == "gpt2":
        backend = _byte_level(tokens, vocab, meta, pre, fail)
        default_bos = pre in _LLAMA3_NAMES
    elif kind == "llama":
        backend = _sentencepiece(tokens, types, vocab, meta, ids["unknown"], fail)
        default_bos = True
    else:
        raise fail(f"tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty in (CONTROL, UNKNOWN)])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    add_bos = meta.get("tokenizer.ggml.add_bos_token", default_bos)
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    bos, eos = ids["bos"], ids["eos"]
    template, specials = ["$A"], {}
    if add_bos and bos is not None:
        template.insert(0, tokens[bos])
        specials[tokens[bos]] = bos
    if add_eos and eos is not None:
        template.append(tokens[eos])
        specials[tokens[eos]] = eos
    if specials:
        backend.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=list(specials.items()))
    config: dict[str, Any] = {
        "chat_template": meta.get("tokenizer.chat_template"),
        "add_bos_token": bool(add_bos) and bos is not None,
        "add_eos_token": bool(add_eos) and eos is not None,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{f"{name}_token": tokens[i] for name, i in
           (("bos", bos), ("eos", eos), ("unk", ids["unknown"]), ("pad", ids["padding"]))
           if i is not None}}
    return HFTokenizer(path, config, backend=backend)


def _byte_level(tokens: list[str], vocab: dict[str, int], meta: Mapping[str, Any], pre: str,
                fail: Fail) -> Backend:
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise fail("a gpt2 vocabulary needs 'tokenizer.ggml.merges'")
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = next((m for m, p in zip(merges, pairs) if len(p) != 2), None)
    if bad is not None:
        raise fail(f"merge {bad!r} is not two tokens separated by a space")
    splits = PRE_TOKENIZERS.get(pre)
    if splits is None:
        raise fail(f"pre-tokenizer 'tokenizer.ggml.pre' = {pre!r} is not supported "
                   f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    backend = Backend(models.BPE(vocab, pairs, ignore_merges=pre in _LLAMA3_NAMES))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(tokens: list[str], types: list[int], vocab: dict[str, int],
                   meta: Mapping[str, Any], unk: int | None, fail: Fail) -> Backend:
    scores = meta.get("tokenizer.ggml.scores")
    merges = meta.get("tokenizer.ggml.merges")
    if isinstance(merges, list):                       # stated: as transformers, use them
        pairs = [tuple(m.split(" ")) for m in merges]
    elif isinstance(scores, list) and len(scores) == len(tokens):
        pairs = sentencepiece_merges(tokens, types, scores)
    else:
        raise fail("a llama vocabulary needs 'tokenizer.ggml.scores' (one per token)")
    byte_fallback = any(t == BYTE for t in types)
    if byte_fallback and not all(f"<0x{b:02X}>" in vocab for b in range(256)):
        raise fail("the vocabulary has byte tokens but not all 256 '<0xNN>' of them")
    backend = Backend(models.BPE(vocab, pairs, unk_token=tokens[unk] if unk is not None
                                 else None, byte_fallback=byte_fallback, fuse_unk=True))
    space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    steps = [normalizers.Prepend("\u2581")] if space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    return backend


def sentencepiece_merges(tokens: list[str], types: list[int],
                         scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to sentencepiece's BPE over these pieces: every split of a
    normal piece into two normal pieces is a merge, ranked by the joined piece's score
    (highest first; ties by id). Byte, control and unused pieces never merge."""
    normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == NORMAL}
    ranked = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[i], i, normal[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]
