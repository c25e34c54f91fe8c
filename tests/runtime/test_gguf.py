"""GGUF files (itt_runtime/model/gguf.py) load as the weights they hold: for every tensor type
the installed ``gguf`` dequantizes, a tiny llama model written as GGUF (Q/K rows in llama.cpp's
order) loads with exactly the state of the Hugging Face directory holding the dequantized
weights, and the logits of both are equal; transformers' own GGUF loader (independent
dequantization and un-permutation) gives the same logits; llama and qwen2 variants (tied,
biases, linear RoPE scaling) give the config and the logits of the Hugging Face directory.
Every bad file is one CheckpointError line naming the tensor or key, raised before the model is
built. The file serves through ``LLM``, ``itt-eval`` and ``itt-upcycle``.

The models have hidden size 256 so that every block size (32 … 256 values) divides a row.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf_files import (
    NOT_DEQUANTIZABLE,
    QUANTIZABLE,
    RANDOM_BLOCKS,
    byte_level_vocab,
    write_gguf,
    write_reference_dir,
)
from hf_models import LLAMA3_SCALING, build_hf_model, hf_logits, load_hf
from hf_tokenizers import HELDOUT, LLAMA3, write_byte_level_tokenizer

from itt_runtime.config import CheckpointError
from itt_runtime.llm import LLM
from itt_runtime.model import loader
from itt_runtime.model.loader import load_config, load_model
from itt_runtime.sampling_params import SamplingParams

SIZES = dict(vocab_size=512, hidden_size=256, intermediate_size=512, bos_token_id=0,
             eos_token_id=1)
PROMPT = list(range(3, 60))
KV = 8 * 2**20                          # KV cache bytes of the LLMs here


def build(out: Path, family: str = "llama", **kw) -> Path:
    """A tiny Hugging Face directory with the byte-level test tokenizer (512 tokens)."""
    build_hf_model(out, family, **{**SIZES, **kw})
    return write_byte_level_tokenizer(out, 511, chat_template=LLAMA3)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("hf") / "llama")


def logits(model, ids=PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def without_eog(cfg):
    """The config without llama.cpp's end-of-turn ids (the one intended difference)."""
    return dataclasses.replace(cfg, extra_eos_token_ids=(), torch_dtype=None)


def gguf_and_reference(tmp_path: Path, hf_dir: Path, qtype: Q = Q.Q8_0, **kw) \
        -> tuple[Path, Path]:
    state = write_gguf(tmp_path / "model.gguf", hf_dir, qtype, vocab=byte_level_vocab(hf_dir),
                       **kw)
    return tmp_path / "model.gguf", write_reference_dir(tmp_path / "ref", hf_dir, state)


# ---- every tensor type ----------------------------------------------------------------------
@pytest.mark.parametrize("qtype", QUANTIZABLE + RANDOM_BLOCKS, ids=lambda q: q.name)
def test_every_type_loads_as_its_dequantized_weights(qtype, hf_llama, tmp_path):
    file, ref = gguf_and_reference(tmp_path, hf_llama, qtype)
    model, _ = load_model(file)
    want, _ = load_model(ref)
    assert without_eog(model.cfg) == without_eog(want.cfg)
    assert same_state(model, want)
    assert torch.allclose(logits(model), logits(want), rtol=0, atol=1e-5)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q2_K, Q.Q4_K, Q.Q6_K,
                                   Q.IQ2_XS, Q.IQ4_XS], ids=lambda q: q.name)
def test_equals_transformers_gguf_loading(qtype, hf_llama, tmp_path):
    """transformers reads the same file with its own dequantization and Q/K un-permutation."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()
    write_gguf(tmp_path / "m.gguf", hf_llama, qtype, vocab=byte_level_vocab(hf_llama))
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf",
                                               dtype=torch.float32).eval()
    model, _ = load_model(tmp_path / "m.gguf")
    want = hf_logits(ref, PROMPT)
    assert (logits(model) - want).abs().max() <= 1e-6 * max(1.0, want.abs().max().item()) * 10


VARIANTS = {"qwen2-biases-tied": dict(family="qwen2", tied=True),
            "llama-mha-attention-bias": dict(gqa=False, attention_bias=True),
            "llama-linear-rope-tied": dict(tied=True, rope_scaling={"rope_type": "linear",
                                                                    "factor": 2.0})}


@pytest.mark.parametrize("name", VARIANTS)
def test_variants_match_their_hugging_face_directory(name, tmp_path):
    hf_dir = build(tmp_path / "hf", **VARIANTS[name])
    file, ref = gguf_and_reference(tmp_path, hf_dir, Q.Q8_0)
    model, _ = load_model(file)
    want, _ = load_model(ref)
    assert without_eog(model.cfg) == without_eog(load_config(ref))
    assert same_state(model, want)
    hf_ref = hf_logits(load_hf(ref), PROMPT)
    assert (logits(model) - hf_ref).abs().max() < 1e-4


def test_config_of_the_file(hf_llama, tmp_path):
    file, ref = gguf_and_reference(tmp_path, hf_llama)
    cfg = load_config(file)
    # llama.cpp's end-of-generation tokens by text: <|end_of_text|> is EOS, <|eot_id|> and
    # <|im_end|> end a turn.
    vocab = byte_level_vocab(hf_llama)["tokenizer.ggml.tokens"]
    assert cfg.eos_token_id == vocab.index("<|end_of_text|>")
    assert set(cfg.extra_eos_token_ids) == {vocab.index("<|eot_id|>"), vocab.index("<|im_end|>")}
    assert cfg.tie_embeddings is False and cfg.n_kv_heads == 2 and cfg.head_dim == 64


# ---- refusals -------------------------------------------------------------------------------
def refused(file: Path, monkeypatch, *words: str) -> str:
    """Loading ``file`` fails with one line naming ``words``, before the model is built."""
    def build_nothing(*a, **k):
        raise AssertionError("the model was built before the refusal")
    monkeypatch.setattr(loader, "_materialize", build_nothing)
    with pytest.raises(CheckpointError) as e:
        load_model(file)
    msg = str(e.value)
    assert "\n" not in msg and str(file.name) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


@pytest.mark.parametrize("qtype", NOT_DEQUANTIZABLE, ids=lambda q: q.name)
def test_a_type_that_does_not_dequantize_is_refused_by_name(qtype, hf_llama, tmp_path,
                                                           monkeypatch):
    f = tmp_path / "m.gguf"
    write_gguf(f, hf_llama, Q.Q8_0, vocab=byte_level_vocab(hf_llama),
               raw_types={"blk.1.ffn_up.weight": qtype})
    refused(f, monkeypatch, "'blk.1.ffn_up.weight'", qtype.name)


def test_an_unknown_type_id_is_refused_by_tensor_name(hf_llama, tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    write_gguf(f, hf_llama, Q.Q8_0, vocab=byte_level_vocab(hf_llama))
    raw = bytearray(f.read_bytes())
    name = b"blk.1.ffn_up.weight"
    at = raw.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    n_dims = int.from_bytes(raw[at:at + 4], "little")
    at += 4 + 8 * n_dims                                    # the tensor's ggml type (u32)
    assert int.from_bytes(raw[at:at + 4], "little") == Q.Q8_0
    raw[at:at + 4] = (99).to_bytes(4, "little")
    f.write_bytes(bytes(raw))
    refused(f, monkeypatch, "'blk.1.ffn_up.weight'", "ggml type 99")


def test_unknown_architecture(hf_llama, tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    write_gguf(f, hf_llama, metadata={"general.architecture": "gemma2"})
    refused(f, monkeypatch, "architecture 'gemma2' is not supported", "llama, qwen2")


@pytest.mark.parametrize("case,kw,words", [
    ("missing", dict(drop=("blk.1.ffn_down.weight",)), ["missing", "'blk.1.ffn_down.weight'"]),
    ("shape", dict(metadata={"{arch}.feed_forward_length": 384}), ["'blk.0.ffn_", "shape",
                                                                   "384"]),
    ("yarn", dict(metadata={"{arch}.rope.scaling.type": "yarn"}), ["rope.scaling.type",
                                                                  "yarn"]),
    ("experts", dict(metadata={"{arch}.expert_count": 8}), ["expert_count"]),
    ("partial-rotary", dict(metadata={"{arch}.rope.dimension_count": 32}),
     ["rope.dimension_count", "partial rotary"]),
    ("vocabulary", dict(metadata={"tokenizer.ggml.tokens": [f"t{i}" for i in range(600)]}),
     ["600 tokens", "512 rows"]),
])
def test_bad_files_are_refused_naming_what_is_wrong(case, kw, words, hf_llama, tmp_path,
                                                     monkeypatch):
    f = tmp_path / "m.gguf"
    write_gguf(f, hf_llama, **{"vocab": byte_level_vocab(hf_llama), **kw})
    refused(f, monkeypatch, *words)


def test_truncated_foreign_and_missing_files(hf_llama, tmp_path, monkeypatch):
    whole = tmp_path / "whole.gguf"
    write_gguf(whole, hf_llama, Q.Q8_0)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:-1000])
    refused(cut, monkeypatch, "truncated")
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"PK\x03\x04" + bytes(100))
    refused(foreign, monkeypatch, "not a GGUF file")
    with pytest.raises(CheckpointError, match="model file .*absent.gguf' does not exist"):
        load_model(tmp_path / "absent.gguf")


def test_llama3_rope_factors_are_read_as_llama3_scaling(tmp_path):
    """llama.cpp stores Llama 3.1's RoPE scaling as per-frequency divisors; the prompt (57
    tokens) passes the shrunk original context (32) of LLAMA3_SCALING."""
    hf_dir = build(tmp_path / "hf", rope_scaling=LLAMA3_SCALING)
    file, ref = gguf_and_reference(tmp_path, hf_dir, Q.Q8_0)
    model, _ = load_model(file)
    assert model.cfg.rope_scaling == load_config(ref).rope_scaling
    assert (logits(model) - hf_logits(load_hf(ref), PROMPT)).abs().max() < 1e-4


def test_other_rope_factors_are_refused(hf_llama, tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    factors = np.linspace(1.0, 3.0, 32, dtype=np.float32)
    write_gguf(f, hf_llama, vocab=byte_level_vocab(hf_llama),
               extra_tensors={"rope_freqs.weight": factors})
    refused(f, monkeypatch, "'rope_freqs.weight'", "not Llama 3's scaling")


# ---- serving --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(hf_llama, tmp_path_factory) -> tuple[Path, Path]:
    """(the Q4_K GGUF, its dequantized Hugging Face directory)."""
    return gguf_and_reference(tmp_path_factory.mktemp("serve"), hf_llama, Q.Q4_K,
                              metadata={"general.sampling.temp": 0.5,
                                        "general.sampling.top_k": 0})


def test_llm_generates_as_the_reference_directory(files):
    file, ref = files
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = ["Once upon a time", "<|im_start|>user<|im_end|>\n\nHi<|eot_id|>"]
    got = LLM(model=str(file), kv_cache_memory=KV).generate(prompts, params)
    want = LLM(model=str(ref), kv_cache_memory=KV).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert [o.prompt_token_ids for o in got] == [o.prompt_token_ids for o in want]


def test_sampling_defaults_and_tokenizer_override(files):
    file, ref = files
    llm = LLM(model=str(file), kv_cache_memory=KV)
    assert llm.get_default_sampling_params().temperature == 0.5
    assert llm.get_default_sampling_params().top_k == -1
    assert llm.tokenizer.chat_template == LLAMA3
    other = LLM(model=str(file), tokenizer=str(ref), kv_cache_memory=KV)
    assert other.tokenizer.path == ref / "tokenizer.json"
    with pytest.raises(CheckpointError, match="has no tokenizer"):
        LLM(model=str(file), tokenizer=str(file.parent / "nowhere"), kv_cache_memory=KV)


def test_server_flags_name_a_gguf_and_a_tokenizer(files):
    from server.cli import build_parser, configs
    file, ref = files
    engine, _ = configs(build_parser().parse_args(["--model", str(file), "--tokenizer",
                                                   str(ref)]))
    assert (engine.model, engine.tokenizer) == (str(file), str(ref))


def test_itt_eval_reads_a_gguf(files, tmp_path, capsys):
    from itt_runtime.training.evaluate import main as itt_eval
    file, ref = files
    text = tmp_path / "text.txt"
    text.write_text("\n".join(HELDOUT.read_text().splitlines()[:20]))
    rows = []
    for model in (file, ref):
        assert itt_eval(["--model", str(model), "--text", str(text), "--budgets", "0",
                         "--seq-len", "64", "--json"]) == 0
        rows.append(json.loads(capsys.readouterr().out)["rows"])
    assert rows[0] == rows[1]


def test_itt_upcycle_a_gguf(files, tmp_path):
    from itt_runtime.training.upcycle import main as itt_upcycle
    file, _ = files
    out = tmp_path / "up"
    assert itt_upcycle([str(file), str(out), "--itt-layers", "1", "--think-steps", "2"]) == 0
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= \
        {p.name for p in out.iterdir()}
    dense, tok = load_model(file)
    up, up_tok = load_model(out)
    assert up.cfg.is_itt
    for budget in (0.0, 1.0):
        from itt_runtime.model.itt import ThresholdRouting
        routing = ThresholdRouting.for_budgets(up.cfg, [budget], torch.device("cpu"))
        with torch.no_grad():
            got = up(torch.tensor([PROMPT]), routing).logits[0]
        assert torch.allclose(got, logits(dense), atol=1e-5)
    text = "<|im_start|>user<|im_end|>\n\nnaïve café 😀<|eot_id|>"
    assert up_tok.encode_prompt(text) == tok.encode_prompt(text)
    assert up_tok.chat_template == tok.chat_template
    assert json.loads((out / "generation_config.json").read_text()) == \
        {"temperature": 0.5, "top_k": 0}


def test_dequantizable_matches_the_package():
    """The up-front type check agrees with what ``gguf.quants`` actually does."""
    from itt_runtime.model.gguf import dequantizable
    for qtype in QUANTIZABLE + RANDOM_BLOCKS:
        assert dequantizable(qtype), qtype.name
    for qtype in NOT_DEQUANTIZABLE:
        assert not dequantizable(qtype), qtype.name
    assert gguf.GGML_QUANT_SIZES[Q.Q4_K] == (256, 144)
