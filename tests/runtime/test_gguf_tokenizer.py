"""The tokenizer of a GGUF file (itt_runtime/tokenizers/gguf_vocab.py) tokenizes as the
tokenizer it was converted from: a byte-level BPE tokenizer.json written as a ``gpt2`` GGUF
vocabulary gives the same ids, text, bytes and special tokens as that tokenizer.json; a
sentencepiece model written as a ``llama`` vocabulary (pieces, scores, types) gives the ids and
text of sentencepiece itself. The pre-tokenizers follow llama.cpp's regular expressions, checked
against the pre-tokenizers of the original tokenizer.json files (SmolLM's digit split, GPT-2's
regex) and transformers' GGUF table (Llama 3, Qwen2). Vocabularies that cannot be built exactly
are refused by name.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from gguf_files import byte_level_vocab, sentencepiece_vocab, write_gguf
from hf_models import build_hf_model
from hf_tokenizers import ADDED_TOKEN, HELDOUT, LLAMA3, write_byte_level_tokenizer
from tokenizers import Regex, pre_tokenizers

from itt_runtime.config import CheckpointError
from itt_runtime.tokenizers.gguf_vocab import gguf_tokenizer
from itt_runtime.tokenizers.hf_tokenizer import HFTokenizer, byte_level_alphabet
from itt_runtime.tokenizers.loader import load_tokenizer
from itt_runtime.tokenizers.tokenizer import TokenizerError

MULTIBYTE = ["naïve café — 日本語 😀 Ωμέγα", "Ünïcödé àçcénts ß ø", "emoji 👩‍👩‍👧 and 🇫🇷"]
PLAIN = ["", " ", "  leading spaces", "trailing  ", "a\n\nb\tc  \n d",
         "Plain ASCII, (1 + 2) * 3 = 9!", "I'm, you're; they'll... 'quoted' DON'T",
         "in 2024 there were 12345 cats", "x=12+3^4|y",
         *MULTIBYTE, *[line for line in HELDOUT.read_text().splitlines() if line.strip()][:30:3]]
SPECIAL = ["<|im_start|>user\nHi<|im_end|>\n", f"call {ADDED_TOKEN} now",
           "two<|eot_id|><|eot_id|>tokens", "<|begin_of_text|>literal bos"]
FILE = Path("model.gguf")


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abc XYZ 0123456789 éü日本😀 \n\t.,'!?-+"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40))) for _ in range(n)]


# ---- byte-level BPE (gpt2) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory) -> Path:
    return write_byte_level_tokenizer(tmp_path_factory.mktemp("bl"), 511, chat_template=LLAMA3)


@pytest.fixture(scope="module")
def pair(byte_level_dir) -> tuple[HFTokenizer, HFTokenizer]:
    """(from the GGUF vocabulary, from tokenizer.json)."""
    return gguf_tokenizer(byte_level_vocab(byte_level_dir), FILE), load_tokenizer(byte_level_dir)


def test_byte_level_ids_and_text_equal_tokenizer_json(pair):
    tok, ref = pair
    for text in PLAIN + SPECIAL + random_texts(200):
        for special in (True, False):
            ids = tok.encode_prompt(text, special)
            assert ids == ref.encode_prompt(text, special), text
        assert tok.encode(text, add_bos=False) == ref.encode(text, add_bos=False), text
        for skip in (True, False):
            assert tok.decode(ids, skip) == ref.decode(ids, skip), text


def test_byte_level_vocabulary_and_specials_equal_tokenizer_json(pair):
    tok, ref = pair
    assert tok.vocab_size == ref.vocab_size == 512
    assert (tok.bos_token_id, tok.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)
    assert tok.add_bos_token and ref.add_bos_token
    assert tok.special_ids == ref.special_ids
    assert tok.chat_template == ref.chat_template == LLAMA3
    for i in range(tok.vocab_size):
        assert tok.token_bytes(i) == ref.token_bytes(i), i
        assert tok.id_to_piece(i) == ref.id_to_piece(i), i


def test_the_tokenizer_of_a_gguf_file(tmp_path):
    hf = build_hf_model(tmp_path / "hf", vocab_size=512, hidden_size=64, bos_token_id=0,
                        eos_token_id=1)
    write_byte_level_tokenizer(hf, 511)
    write_gguf(tmp_path / "m.gguf", hf, vocab=byte_level_vocab(hf))
    tok, ref = load_tokenizer(tmp_path / "m.gguf"), load_tokenizer(hf)
    assert tok.path == tmp_path / "m.gguf"
    assert [tok.encode_prompt(t) for t in SPECIAL] == [ref.encode_prompt(t) for t in SPECIAL]


def test_save_writes_a_tokenizer_directory(pair, tmp_path):
    tok, ref = pair
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    for text in PLAIN + SPECIAL:
        assert again.encode_prompt(text) == ref.encode_prompt(text), text
    assert again.chat_template == LLAMA3 and again.add_bos_token


# ---- sentencepiece (llama) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """A sentencepiece BPE model as Llama's: identity normalisation, spaces kept, byte
    fallback, one user-defined symbol."""
    import sentencepiece as spm
    prefix = tmp_path_factory.mktemp("sp") / "sp"
    spm.SentencePieceTrainer.train(
        input=str(HELDOUT), model_prefix=str(prefix), vocab_size=700, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, user_defined_symbols=[ADDED_TOKEN],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return prefix.with_suffix(".model")


def test_sentencepiece_ids_and_text_equal_sentencepiece(sp_model):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = gguf_tokenizer(sentencepiece_vocab(sp_model, (ADDED_TOKEN,)), FILE)
    assert tok.vocab_size == sp.get_piece_size()
    for text in PLAIN + random_texts(300):
        ids = tok.encode(text, add_bos=False)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids), text
    # Around added tokens llama.cpp (and Llama 2's tokenizer.json) differ from sentencepiece:
    # the text after one starts a new stretch, which gets its own space prefix.
    pieces = [tok.id_to_piece(i) for i in tok.encode(f"call {ADDED_TOKEN} now", add_bos=False)]
    assert pieces == [sp.id_to_piece(i) for i in sp.encode("call ")] + [ADDED_TOKEN] + \
        [sp.id_to_piece(i) for i in sp.encode(" now")]       # "▁" + "▁now"
    assert tok.encode("hi")[0] == sp.bos_id() and tok.add_bos_token
    assert tok.encode_prompt("</s>", add_special_tokens=False) == [sp.eos_id()]
    assert tok.special_ids >= {sp.bos_id(), sp.eos_id()}
    assert tok.token_bytes(tok.encode("é", add_bos=False)[-1]) is not None


def test_sentencepiece_without_space_prefix(sp_model):
    meta = {**sentencepiece_vocab(sp_model), "tokenizer.ggml.add_space_prefix": False}
    tok = gguf_tokenizer(meta, FILE)
    with_prefix = gguf_tokenizer(sentencepiece_vocab(sp_model), FILE)
    assert tok.encode(" hello", add_bos=False) == with_prefix.encode("hello", add_bos=False)
    assert tok.decode(tok.encode("hello world", add_bos=False)) == "hello world"


# ---- pre-tokenizers -------------------------------------------------------------------------
def pieces(pre_tokenizer, text: str) -> list[str]:
    return [p for p, _ in pre_tokenizer.pre_tokenize_str(text)]


def ours(pre: str):
    """The pre-tokenizer gguf_tokenizer builds for ``tokenizer.ggml.pre`` = ``pre``."""
    alphabet = sorted(byte_level_alphabet())
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": alphabet, "tokenizer.ggml.merges": []}
    return gguf_tokenizer(meta, FILE)._tok.pre_tokenizer


def byte_level_after(*splits):
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                      use_regex=False)])


def references() -> dict[str, object]:
    """What each pre-tokenizer must equal, from elsewhere than llama.cpp's table: SmolLM's and
    GPT-2's own tokenizer.json pre-tokenizers, and transformers' GGUF regexes."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_PRE_TOKENIZER_SPLITS,
    )
    return {
        "smollm": pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
        "gpt-2": pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        **{name: byte_level_after(pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS[name]),
                                                       behavior="isolated"))
           for name in ("llama-bpe", "qwen2")}}


@pytest.mark.parametrize("pre", ["smollm", "gpt-2", "llama-bpe", "qwen2"])
def test_pre_tokenizers_equal_the_originals(pre):
    mine, reference = ours(pre), references()[pre]
    for text in PLAIN + SPECIAL + random_texts(300, seed=1):
        assert pieces(mine, text) == pieces(reference, text), text


def test_pre_tokenizer_examples():
    assert pieces(ours("smollm"), "in 2024") == ["in", "Ġ", "2", "0", "2", "4"]
    assert pieces(ours("llama-bpe"), "12345 ok") == ["123", "45", "Ġok"]
    assert pieces(ours("qwen2"), "123") == ["1", "2", "3"]
    # llama.cpp's default: punctuation runs first, then GPT-2's regex, then digit groups.
    assert pieces(ours("default"), "a+=b 1234") == ["a", "+=", "b", "Ġ", "123", "4"]


# ---- refusals -------------------------------------------------------------------------------
@pytest.mark.parametrize("change,words", [
    ({"tokenizer.ggml.model": "bert"}, ["tokenizer model 'bert'", "gpt2, llama"]),
    ({"tokenizer.ggml.pre": "mystery"}, ["'mystery'", "smollm"]),
    ({"tokenizer.ggml.merges": None}, ["tokenizer.ggml.merges"]),
    ({"tokenizer.ggml.token_type": [1, 1]}, ["token_type", "2 entries"]),
    ({"tokenizer.ggml.eos_token_id": 10_000}, ["eos_token_id", "10000"]),
    ({"tokenizer.ggml.tokens": None}, ["no vocabulary"]),
])
def test_vocabularies_that_cannot_be_built_are_refused(change, words, byte_level_dir):
    meta = {k: v for k, v in {**byte_level_vocab(byte_level_dir), **change}.items()
            if v is not None}
    with pytest.raises(TokenizerError) as e:
        gguf_tokenizer(meta, FILE)
    msg = str(e.value)
    assert msg.startswith("model.gguf: ") and "--tokenizer DIR" in msg
    for w in words:
        assert w in msg, msg


def test_duplicate_tokens_are_refused(byte_level_dir):
    meta = byte_level_vocab(byte_level_dir)
    tokens = list(meta["tokenizer.ggml.tokens"])
    tokens[300] = tokens[200]
    with pytest.raises(TokenizerError, match="twice .ids 200 and 300"):
        gguf_tokenizer({**meta, "tokenizer.ggml.tokens": tokens}, FILE)


def test_a_gguf_vocabulary_larger_than_the_embedding(tmp_path):
    from itt_runtime.config import ModelConfig
    hf = build_hf_model(tmp_path / "hf", vocab_size=512, hidden_size=64)
    write_byte_level_tokenizer(hf, 511)
    write_gguf(tmp_path / "m.gguf", hf, vocab=byte_level_vocab(hf))
    with pytest.raises(CheckpointError, match="m.gguf has 512 pieces but the row count"):
        load_tokenizer(tmp_path / "m.gguf", ModelConfig(vocab_size=100))
