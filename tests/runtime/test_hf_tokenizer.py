"""Hugging Face tokenizer.json: ids and text as transformers' fast tokenizer gives them, for a
byte-level BPE ("Ġ") and a sentencepiece-style ("▁", byte fallback) tokenizer, with added and
special tokens; streaming detokenization equal to a full decode on multi-byte text; the
loader's choice and its errors; structured outputs over a byte-level vocabulary.

The tokenizers are trained on the (almost all ASCII) held-out slice, so accented letters, CJK
and emoji become several byte tokens each: one character split across tokens.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from hf_tokenizers import (
    ADDED_TOKEN,
    HELDOUT,
    hf_reference,
    write_byte_level_tokenizer,
    write_metaspace_tokenizer,
)

from itt_runtime.config import CheckpointError
from itt_runtime.sampling.structured_output import GrammarCompiler, GrammarSpec
from itt_runtime.tokenizers.hf_tokenizer import HFTokenizer
from itt_runtime.tokenizers.loader import load_tokenizer
from itt_runtime.tokenizers.tokenizer import SentencePieceTokenizer

MULTIBYTE = ["naïve café — 日本語 😀 Ωμέγα", "😀😀😀 ok Ω日", "Ünïcödé àçcénts ß ø",
             "中文文本，标点。", "emoji 👩‍👩‍👧 family and flags 🇫🇷"]
SPECIAL = ["<|im_start|>user\nHi<|im_end|>\n", f"call {ADDED_TOKEN} now",
           "two<|eot_id|><|eot_id|>tokens", "<s>literal bos</s> and <|begin_of_text|>"]
LINES = [line for line in HELDOUT.read_text().splitlines() if line.strip()][:40:4]
TEXTS = ["", " ", "  leading spaces", "Plain ASCII, (1 + 2) * 3 = 9!", *MULTIBYTE, *SPECIAL,
         *LINES]
ALPHABET = "abc xyz éàü ß日本語中文😀👍Ωλ\n—,."
FFFD = "\ufffd"

KINDS = {"byte_level": write_byte_level_tokenizer, "metaspace": write_metaspace_tokenizer}


@pytest.fixture(scope="module", params=sorted(KINDS))
def hf_dir(request, tmp_path_factory):
    return KINDS[request.param](tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def tok(hf_dir):
    return load_tokenizer(hf_dir)


@pytest.fixture(scope="module")
def ref(hf_dir):
    return hf_reference(hf_dir)


def random_text(rng: random.Random, n: int = 40) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


# ---- the same ids and text as transformers --------------------------------------------------
def test_loader_picks_tokenizer_json(tok, hf_dir):
    assert isinstance(tok, HFTokenizer)
    assert tok.kind == "PreTrainedTokenizerFast"


def test_vocabulary_and_special_tokens_match(tok, ref):
    assert tok.vocab_size == len(ref)                     # added tokens included
    assert (tok.bos_token, tok.bos_token_id) == (ref.bos_token, ref.bos_token_id)
    assert (tok.eos_token, tok.eos_token_id) == (ref.eos_token, ref.eos_token_id)
    assert tok.special_ids == set(ref.all_special_ids) | {
        i for i, t in ref.added_tokens_decoder.items() if t.special}


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(tok, ref, add_special_tokens):
    for text in TEXTS:
        want = ref(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert tok.encode_prompt(text, add_special_tokens) == want, text
        assert tok.encode(text, add_bos=add_special_tokens) == want, text


def test_bos_is_added_once_by_the_post_processor(tok):
    bos = tok.bos_token_id
    assert tok.add_bos_token
    for text in (t for t in TEXTS if tok.bos_token not in t):    # not literally in the text
        ids = tok.encode(text)
        assert ids[0] == bos and bos not in ids[1:], text
        assert tok.encode(text, add_eos=True) == ids + [tok.eos_token_id]


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(tok, ref, skip):
    rng = random.Random(0)
    for text in TEXTS + [random_text(rng) for _ in range(20)]:
        ids = ref(text)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=skip) == \
            ref.decode(ids, skip_special_tokens=skip), text
    # Arbitrary id sequences too (byte tokens in any order: invalid UTF-8 becomes U+FFFD).
    for _ in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 12))]
        assert tok.decode(ids, skip_special_tokens=skip) == \
            ref.decode(ids, skip_special_tokens=skip), ids


def test_added_and_special_tokens(tok, ref):
    ids = tok.encode_prompt("<|im_start|>x<|im_end|>", add_special_tokens=False)
    start, end = (tok.encode_prompt(t, False) for t in ("<|im_start|>", "<|im_end|>"))
    assert len(start) == len(end) == 1 and ids[0] == start[0] and ids[-1] == end[0]
    assert start[0] in tok.special_ids and tok.token_bytes(start[0]) is None
    added = tok.encode_prompt(ADDED_TOKEN, add_special_tokens=False)
    assert len(added) == 1 and added[0] not in tok.special_ids
    # Special tokens vanish when skipped, an added (non-special) one is text.
    assert tok.decode(ids) == "x"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>x<|im_end|>"
    assert tok.decode(tok.encode(f"a {ADDED_TOKEN} b")) == f"a {ADDED_TOKEN} b"


def test_token_bytes_spell_the_text(tok):
    """What structured outputs and logprob tables use: each token's bytes, concatenated, are
    the text (sentencepiece-style adds the one leading space that decoding drops)."""
    for text in MULTIBYTE + LINES + [f"x {ADDED_TOKEN} y"]:
        ids = tok.encode(text, add_bos=False)
        raw = b"".join(tok.token_bytes(i) or b"" for i in ids)
        lead = b" " if tok.id_to_piece(ids[0]).startswith("\u2581") else b""
        assert raw == lead + text.encode(), text
        assert len(text) <= len(ids) * tok.max_piece_chars


def test_multibyte_characters_are_split_across_tokens(tok):
    pieces = [tok.token_bytes(i) for i in tok.encode("😀日本語", add_bos=False)]
    assert any(p is not None and len(p) == 1 and p[0] >= 0x80 for p in pieces)
    assert len(pieces) >= 8


def test_token_text(tok):
    """A whole character is its text; a lone byte of a longer one shows its piece."""
    for i in tok.encode("hello world", add_bos=False):
        assert tok.token_text(i) == (tok.token_bytes(i) or b"").decode()
    emoji = tok.encode("😀", add_bos=False)
    lone = [i for i in emoji if (tok.token_bytes(i) or b" ")[0] >= 0x80
            and len(tok.token_bytes(i) or b"") == 1]
    assert lone and all(tok.token_text(i) == tok.id_to_piece(i) for i in lone)


# ---- streaming detokenization ---------------------------------------------------------------
def stream(tok, prompt: list[int], ids: list[int], rng: random.Random | None) -> str:
    """Feed ``ids`` one at a time (or in random groups); every delta is complete text and
    the text so far is a prefix of the full decode."""
    inc = tok.incremental(prompt)
    out, i = "", 0
    while i < len(ids):
        n = rng.randint(1, 5) if rng else 1
        delta = inc.add(ids[i:i + n])
        i += n
        assert FFFD not in delta
        out += delta
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("grouping", ["single", "random"])
def test_streaming_equals_full_decode(tok, seed, grouping):
    rng = random.Random(seed)
    for _ in range(10):
        text = random_text(rng, rng.randint(1, 60))
        prompt_text = rng.choice(["", "Q: ", "Prompt ending in 日本", "x 😀"])
        prompt = tok.encode(prompt_text)
        gen = tok.encode(text, add_bos=False) + [tok.eos_token_id]
        full = tok.decode(prompt + gen)
        head = tok.decode(prompt)
        got = stream(tok, prompt, gen, rng if grouping == "random" else None)
        assert full.startswith(head.rstrip(FFFD))
        assert got == full[len(head):], (prompt_text, text)


def test_streaming_a_prompt_ending_inside_a_character(tok):
    """The generation's text starts after the prompt's last complete character. (Byte
    fallback decodes a run of byte tokens that ends mid-character to U+FFFD throughout, so
    the prompt's complete text is that of its longest prefix without a trailing U+FFFD.)"""
    ids = tok.encode("start 日本語😀 end", add_bos=False)
    full = tok.decode(ids)
    for cut in range(1, len(ids)):
        k = max([k for k in range(cut + 1) if not tok.decode(ids[:k]).endswith(FFFD)])
        got = stream(tok, ids[:cut], ids[cut:], None)
        assert tok.decode(ids[:k]) + got == full, cut


# ---- the loader -----------------------------------------------------------------------------
def test_tokenizer_json_wins_over_tokenizer_model(hf_dir, tokenizer_file, tmp_path):
    d = tmp_path / "both"
    shutil.copytree(hf_dir, d)
    shutil.copyfile(tokenizer_file, d / "tokenizer.model")
    assert isinstance(load_tokenizer(d), HFTokenizer)
    (d / "tokenizer.json").unlink()
    sp = load_tokenizer(d)
    assert isinstance(sp, SentencePieceTokenizer) and sp.config["bos_token"]


def broken(hf_dir, tmp_path, file: str, content: str) -> str:
    d = tmp_path / "bad"
    shutil.copytree(hf_dir, d)
    (d / file).write_text(content)
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(d)
    return str(e.value)


def test_bad_tokenizer_json(hf_dir, tmp_path):
    msg = broken(hf_dir, tmp_path, "tokenizer.json", '{"model": {"type": "Nope"}}')
    assert "tokenizer.json" in msg and "not a Hugging Face tokenizer" in msg
    assert "not valid JSON" in broken(hf_dir, tmp_path / "2", "tokenizer.json", "{")


def test_bad_tokenizer_config(hf_dir, tmp_path):
    msg = broken(hf_dir, tmp_path, "tokenizer_config.json", '{"eos_token": "<|nope|>"}')
    assert "tokenizer_config.json" in msg and "eos_token" in msg and "<|nope|>" in msg
    msg = broken(hf_dir, tmp_path / "2", "tokenizer_config.json",
                 '{"chat_template": [{"name": "tool_use", "template": "x"}]}')
    assert "tokenizer_config.json" in msg and "default" in msg
    msg = broken(hf_dir, tmp_path / "3", "tokenizer_config.json", '{"chat_template": 3}')
    assert "'chat_template' must be a string" in msg


def test_chat_template_sources(hf_dir, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert load_tokenizer(d).chat_template is None
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"},
                            {"name": "default", "template": "D"}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_tokenizer(d).chat_template == "D"
    (d / "chat_template.jinja").write_text("J")
    assert load_tokenizer(d).chat_template == "J"


def test_vocabulary_larger_than_the_embedding(hf_dir):
    from itt_runtime.config import ModelConfig
    cfg = ModelConfig(vocab_size=100)
    with pytest.raises(CheckpointError, match="tokenizer.json has .* pieces but config.json"):
        load_tokenizer(hf_dir, cfg)


# ---- structured outputs over this vocabulary ------------------------------------------------
SCHEMA = {"type": "object", "properties": {
    "ok": {"type": "boolean"}, "city": {"enum": ["Zürich", "東京", "naïve 😀"]},
    "n": {"enum": [1, 22, 333]}}, "required": ["ok", "city", "n"]}


def random_walk(grammar, vocab_size: int, gen: torch.Generator, limit: int = 10_000):
    """Follow random tokens among those the grammar allows until it terminates (or ``limit``
    tokens); returns (matcher, ids)."""
    import xgrammar as xgr
    m, ids = grammar.matcher(), []
    while not m.is_terminated() and len(ids) < limit:
        mask = xgr.allocate_token_bitmask(1, vocab_size)
        m.fill_next_token_bitmask(mask)
        logits = torch.rand(1, vocab_size, generator=gen)
        xgr.apply_token_bitmask_inplace(logits, mask)
        t = int(logits.argmax())
        assert m.accept_token(t)
        ids.append(t)
    return m, ids


def test_structured_output_json_schema(tok):
    """Random walks through the grammar's allowed tokens always spell valid JSON for the
    schema, and the tokenizer's own encoding of a valid answer is accepted."""
    compiler = GrammarCompiler(tok, tok.vocab_size)
    grammar = compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    want = '{"ok": true, "city": "東京", "n": 22}'
    ids = tok.encode(want, add_bos=False)
    if tok.token_bytes(ids[0]) == b" ":     # "▁" that sentencepiece-style puts first
        ids = ids[1:]
    m = grammar.matcher()
    for t in ids:
        assert m.accept_token(t), tok.id_to_piece(t)
    assert m.accept_token(tok.eos_token_id) and m.is_terminated()
    gen = torch.Generator().manual_seed(0)
    cities = set()
    for _ in range(8):
        m, ids = random_walk(grammar, tok.vocab_size, gen, limit=300)
        assert m.is_terminated() and ids[-1] == tok.eos_token_id
        value = json.loads(tok.decode(ids))
        assert set(value) == {"ok", "city", "n"} and value["n"] in (1, 22, 333)
        cities.add(value["city"])
    assert cities <= {"Zürich", "東京", "naïve 😀"}


def test_structured_output_choice_outside_the_bmp(tok):
    """A choice with an emoji (outside the BMP) and escapes: every allowed token path spells
    exactly it (an escaped emoji became a surrogate pair the grammar read as two invalid
    characters)."""
    target = 'naïve 😀 👩‍👩‍👧 "q" \\ \n日本'
    grammar = GrammarCompiler(tok, tok.vocab_size).compile(
        GrammarSpec("choice", json.dumps([target])))
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        _, ids = random_walk(grammar, tok.vocab_size, gen)
        assert tok.decode(ids) == target


def test_streaming_keeps_special_tokens_when_asked(tok):
    prompt = tok.encode("Hi", add_bos=True)
    gen = tok.encode_prompt("<|im_start|>a 日本<|im_end|>b", add_special_tokens=False)
    for skip in (True, False):
        full = tok.decode(prompt + gen, skip_special_tokens=skip)
        head = tok.decode(prompt, skip_special_tokens=skip)
        inc = tok.incremental(prompt, skip_special_tokens=skip)
        assert "".join(inc.add([t]) for t in gen) == full[len(head):]
        assert ("<|im_start|>" in full) != skip


def test_add_bos_token_in_the_config_overrides_the_post_processor(hf_dir, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False}))
    tok = load_tokenizer(d)
    assert not tok.add_bos_token and tok.encode("hi") == tok.encode("hi", add_bos=False)
    raw = json.loads((d / "tokenizer.json").read_text())
    raw["post_processor"] = None                   # nothing adds BOS now…
    (d / "tokenizer.json").write_text(json.dumps(raw))
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": True}))
    tok = load_tokenizer(d)                        # …but the config asks for it
    assert tok.add_bos_token
    assert tok.encode("hi") == [tok.bos_token_id] + tok.encode("hi", add_bos=False)
    assert tok.bos_token_id not in tok.encode("hi", add_bos=False)


def test_special_tokens_map_names_bos_and_eos(hf_dir, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    bos, eos = cfg.pop("bos_token"), cfg.pop("eos_token")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": bos, "special": True}, "eos_token": eos}))
    tok = load_tokenizer(d)
    assert (tok.bos_token, tok.eos_token) == (bos, eos)
    (d / "special_tokens_map.json").unlink()
    tok = load_tokenizer(d)                        # nothing names them
    assert tok.bos_token_id == tok.eos_token_id == -1 and tok.bos_token is None


def test_a_completed_grammar_allows_every_stop_id(tok):
    """A model with several end-of-sequence ids (Llama 3: <|end_of_text|>, <|eot_id|>): once
    the grammar is complete each of them may end it, and no other id is a stop."""
    import xgrammar as xgr
    other_stop = tok.vocab_size - 1

    def allowed_after_yes(grammar):
        """Spell "yes" by always taking the first allowed token; return (matcher, ids
        allowed once it is spelled)."""
        m = grammar.matcher()
        while True:
            mask = xgr.allocate_token_bitmask(1, tok.vocab_size)
            m.fill_next_token_bitmask(mask)
            logits = torch.zeros(1, tok.vocab_size)
            xgr.apply_token_bitmask_inplace(logits, mask)
            allowed = torch.nonzero(logits[0] == 0).flatten().tolist()
            text = [t for t in allowed if t not in (tok.eos_token_id, other_stop)]
            if not text:
                return m, set(allowed)
            assert m.accept_token(text[0])

    two = GrammarCompiler(tok, tok.vocab_size, [tok.eos_token_id, other_stop]).compile(
        GrammarSpec("choice", json.dumps(["yes"])))
    for stop in (tok.eos_token_id, other_stop):
        m, allowed = allowed_after_yes(two)
        assert allowed == {tok.eos_token_id, other_stop}
        assert m.accept_token(stop) and m.is_terminated()
    one = GrammarCompiler(tok, tok.vocab_size).compile(GrammarSpec("choice", '["yes"]'))
    m, allowed = allowed_after_yes(one)
    assert allowed == {tok.eos_token_id}


def test_config_names_the_pad_token_as_a_string_or_an_added_token(hf_dir, tmp_path):
    """``/tokenizer_info`` and chat templates read ``pad_token`` (and ``unk_token``) from the
    config, given as a string, an AddedToken object, or in special_tokens_map.json."""
    d = tmp_path / "t"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    eos = cfg["eos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_tokenizer(d).config_token("pad_token") is None
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "pad_token": eos}))
    assert load_tokenizer(d).config_token("pad_token") == eos
    added = {"__type": "AddedToken", "content": eos, "lstrip": False, "normalized": False,
             "rstrip": False, "single_word": False, "special": True}
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "pad_token": added}))
    assert load_tokenizer(d).config_token("pad_token") == eos
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "special_tokens_map.json").write_text(json.dumps({"pad_token": added}))
    assert load_tokenizer(d).config_token("pad_token") == eos
