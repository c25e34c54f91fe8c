"""Tokenizer: BOS/EOS handling and streaming detokenization of multi-byte text.

The session tokenizer is trained on the (almost all ASCII) held-out slice, so accented
letters, CJK, Greek and emoji fall back to byte pieces that split characters across tokens —
the hard case for incremental detokenization.
"""

from __future__ import annotations

import random

import pytest

TEXT = "naïve café — 日本語 😀 Ωμέγα"
TEXTS = [TEXT, "Plain ASCII text, with punctuation: (1 + 2) * 3 = 9!", "😀😀😀 ok Ω日"]
FFFD = "\ufffd"


def complete_prefix(text: str) -> str:
    """``text`` without a trailing incomplete character (decoded as U+FFFD)."""
    return text.rstrip(FFFD)


# ---- encode / decode --------------------------------------------------------------------------
def test_special_token_ids(tokenizer):
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert tokenizer.vocab_size == 512


def test_multibyte_text_uses_byte_fallback_pieces(tokenizer):
    pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode(TEXT, add_bos=False)]
    assert "<0xF0>" in pieces                      # the emoji's first byte: split over tokens
    assert sum(p.startswith("<0x") for p in pieces) >= 10
    assert tokenizer.sp.unk_id() not in tokenizer.encode(TEXT)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_adds_bos_only_by_default(tokenizer, text):
    ids = tokenizer.encode(text)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert ids[0] == bos and bos not in ids[1:] and eos not in ids
    assert tokenizer.encode(text, add_bos=False) == ids[1:]
    assert tokenizer.encode(text, add_eos=True) == ids + [eos]
    assert tokenizer.encode(text, add_bos=False, add_eos=True) == ids[1:] + [eos]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips_and_skips_special_tokens(tokenizer, text):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    body = tokenizer.encode(text, add_bos=False)
    assert tokenizer.decode(body) == text
    assert tokenizer.decode(tokenizer.encode(text, add_eos=True)) == text
    # BOS/EOS anywhere (e.g. a packed training stream) are dropped.
    assert tokenizer.decode([bos] + body + [eos, bos] + body + [eos]) == \
        tokenizer.decode(body + body)


def test_decode_of_nothing(tokenizer):
    assert tokenizer.decode([]) == ""
    assert tokenizer.decode([tokenizer.bos_token_id, tokenizer.eos_token_id]) == ""
    assert tokenizer.encode("", add_bos=False) == []


# ---- incremental detokenization -----------------------------------------------------------
def random_groups(ids: list[int], rng: random.Random, most: int = 5) -> list[list[int]]:
    groups, i = [], 0
    while i < len(ids):
        n = rng.randint(1, most)
        groups.append(ids[i:i + n])
        i += n
    return groups


def stream(tokenizer, prompt: list[int], groups: list[list[int]]) -> list[str]:
    """Feed ``groups`` to a detokenizer; check every step; return the deltas.

    The text so far is always a prefix of the complete text so far. Fed one token at a time,
    it *is* that text: only an incomplete trailing character is held back. (A group that
    ends inside a character may hold back all of its text until a later add.)"""
    inc = tokenizer.incremental(prompt)
    prompt_text = complete_prefix(tokenizer.decode(prompt))
    deltas, seen = [], list(prompt)
    one_at_a_time = all(len(g) == 1 for g in groups)
    for g in groups:
        delta = inc.add(g)
        seen += g
        assert FFFD not in delta, (g, delta)
        deltas.append(delta)
        so_far = complete_prefix(tokenizer.decode(seen))
        assert so_far.startswith(prompt_text)
        expected = so_far[len(prompt_text):]
        if one_at_a_time:
            assert "".join(deltas) == expected, (g, deltas)
        else:
            assert expected.startswith("".join(deltas)), (g, deltas)
    assert inc.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_equals_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_eos=True)
    deltas = stream(tokenizer, [], [[i] for i in ids])
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert deltas[-1] == ""                      # EOS adds no text


@pytest.mark.parametrize("seed", range(8))
def test_random_sized_groups_equal_full_decode(tokenizer, seed):
    rng = random.Random(seed)
    text = " ".join(rng.sample(TEXTS, len(TEXTS)))
    ids = tokenizer.encode(text)
    deltas = stream(tokenizer, [], random_groups(ids, rng))
    assert "".join(deltas) == text


PROMPTS = [
    "Question: what is",                          # ends in ASCII
    "Ωμέγα 😀",                                   # ends with a complete byte-fallback char
    "A longer prompt that ends in CJK 日本語",     # the context window starts mid-character
    "x 😀😀",
]


@pytest.mark.parametrize("prompt_text", PROMPTS)
@pytest.mark.parametrize("grouping", ["single", "random"])
def test_with_a_prompt_prefix(tokenizer, prompt_text, grouping):
    prompt = tokenizer.encode(prompt_text)
    gen = tokenizer.encode(" " + TEXT + " and more", add_bos=False)
    rng = random.Random(len(prompt_text))
    groups = [[i] for i in gen] if grouping == "single" else random_groups(gen, rng)
    deltas = stream(tokenizer, prompt, groups)
    full = tokenizer.decode(prompt + gen)
    assert full.startswith(prompt_text)
    assert "".join(deltas) == full[len(prompt_text):]


def test_context_window_starting_inside_a_character(tokenizer):
    # Every cut point of a prompt whose last ~6 tokens are byte pieces, as long as the
    # prompt itself ends on a complete character.
    prompt_all = tokenizer.encode("a long prompt here 😀😀")
    gen = tokenizer.encode(" and more 日本", add_bos=False)
    tested = 0
    for cut in range(2, len(prompt_all) + 1):
        prompt = prompt_all[:cut]
        if tokenizer.decode(prompt).endswith(FFFD):
            continue
        rest = prompt_all[cut:] + gen
        deltas = stream(tokenizer, prompt, [[i] for i in rest])
        full = tokenizer.decode(prompt + rest)
        assert "".join(deltas) == full[len(tokenizer.decode(prompt)):]
        tested += 1
    assert tested >= 5


def test_prompt_ending_inside_a_character(tokenizer):
    ids = tokenizer.encode("say 😀😀 ok", add_bos=False)
    cut = ids.index(tokenizer.sp.piece_to_id("<0x9F>")) + 1        # after 2 of the 4 bytes
    prompt, gen = ids[:cut], ids[cut:]
    assert tokenizer.decode(prompt).endswith(FFFD)
    deltas = stream(tokenizer, prompt, [[i] for i in gen])
    assert "".join(deltas) == "😀😀 ok"
