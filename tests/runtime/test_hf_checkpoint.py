"""Hugging Face LLaMA-family directories (Llama, Qwen2, Mistral) are served as transformers
computes them: the reference model and the engine's logits equal transformers' (fp32, 1e-4) for
single-file and sharded, tied and untied, GQA, biased and RoPE-scaled checkpoints; eos lists and
generation_config.json stop generation and set the sampling defaults; every bad input is a
CheckpointError naming the file and the problem."""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hf_models import LLAMA3_SCALING, build_hf_model, hf_logits, load_hf

from itt_runtime.config import CheckpointError, ConfigError, ModelConfig
from itt_runtime.llm import LLM
from itt_runtime.model.itt import ITTModel
from itt_runtime.model.loader import load_model
from itt_runtime.sampling_params import SamplingParams

VARIANTS = {
    "llama-tied-gqa": dict(family="llama", tied=True),
    "llama-untied-sharded-llama3": dict(family="llama", max_shard_size="60KB",
                                        rope_scaling=LLAMA3_SCALING),
    "qwen2-biases": dict(family="qwen2"),
    "mistral-mha-linear-tied": dict(family="mistral", gqa=False, tied=True,
                                    rope_scaling={"rope_type": "linear", "factor": 2.0}),
}
VOCAB = 512
MAX_NEW = 4


@pytest.fixture(scope="module")
def dirs(tokenizer_file, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: build_hf_model(root / name, tokenizer_file=tokenizer_file, seed=i, **kw)
            for i, (name, kw) in enumerate(VARIANTS.items())}


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """Prompts of mixed lengths (1 … 90 tokens: past llama3's 32-token original context)."""
    rng = random.Random(0)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (1, 7, 23, 90, 41, 3)]


def test_sharded_variant_is_sharded(dirs):
    d = dirs["llama-untied-sharded-llama3"]
    assert (d / "model.safetensors.index.json").is_file()
    assert len(list(d.glob("model-*-of-*.safetensors"))) > 2


@pytest.mark.parametrize("name", VARIANTS)
def test_reference_model_equals_transformers(name, dirs, prompts):
    ref = load_hf(dirs[name])
    model, _ = load_model(dirs[name])
    assert not model.cfg.is_itt and model.cfg.max_extra_steps == 0
    with torch.no_grad():
        for ids in prompts[2:4]:
            got = model(torch.tensor([ids])).logits[0]
            err = (got - hf_logits(ref, ids)).abs().max().item()
            assert err <= 1e-4, f"{name}: max abs error {err}"


def test_the_comparison_sees_rope_scaling(dirs, prompts):
    """Dropping llama3 scaling changes the logits far beyond the tolerance: the equality
    above is evidence that the scaling is implemented, not that it does not matter."""
    d = dirs["llama-untied-sharded-llama3"]
    model, _ = load_model(d)
    assert model.cfg.rope_scaling is not None
    unscaled = ITTModel(replace(model.cfg, rope_scaling=None))
    unscaled.load_state_dict(model.state_dict())
    ids = prompts[3]
    with torch.no_grad():
        err = (unscaled(torch.tensor([ids])).logits[0] - hf_logits(load_hf(d), ids)).abs().max()
    assert err > 1e-2


class SamplerSpy:
    """Wraps the engine's sampler: records each sampled row's logits by sequence and step."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.rows: dict[tuple[str, int], torch.Tensor] = {}

    def __call__(self, logits, seqs, *args, **kwargs):
        for row, seq in zip(logits, seqs):
            self.rows[(seq.request_id, len(seq.output_token_ids))] = row.clone()
        return self.sampler(logits, seqs, *args, **kwargs)


@pytest.mark.parametrize("name", VARIANTS)
def test_engine_logits_equal_transformers_in_a_mixed_batch(name, dirs, prompts):
    """All prompts in one batch, with chunked prefill (a 32-token step budget): every
    sampled row's logits equal transformers' on the same tokens, within 1e-4."""
    llm = LLM(str(dirs[name]), max_num_batched_tokens=32)
    spy = llm.engine.runner.sampler = SamplerSpy(llm.engine.runner.sampler)
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0.0,
                                                ignore_eos=True, think_budget=0.5))
    ref = load_hf(dirs[name])
    for i, (ids, out) in enumerate(zip(prompts, outs)):
        gen = out.outputs[0].token_ids
        assert len(gen) == MAX_NEW
        assert out.outputs[0].thinking == [0] * MAX_NEW            # dense: no extra steps
        want = hf_logits(ref, ids + gen)[len(ids) - 1:]           # (MAX_NEW + 1, vocab)
        for k in range(MAX_NEW):
            got = spy.rows[(out.request_id, k)]
            err = (got - want[k]).abs().max().item()
            assert err <= 1e-4, f"{name} prompt {i} step {k}: max abs error {err}"
            assert gen[k] == int(want[k].argmax())


# ---- stop ids and generation_config.json ----------------------------------------------------
@pytest.fixture
def llama(tokenizer_file, tmp_path) -> Path:
    return build_hf_model(tmp_path / "m", tokenizer_file=tokenizer_file,
                          generation={"do_sample": True, "temperature": 0.6, "top_p": 0.9,
                                      "top_k": 20})


def edit_json(file: Path, **changes) -> None:
    raw = json.loads(file.read_text())
    raw.update(changes)
    file.write_text(json.dumps(raw))


def greedy_tokens(path: Path, prompt: list[int], **kw) -> tuple[list[int], str]:
    out = LLM(str(path)).generate([prompt], SamplingParams(max_tokens=6, temperature=0.0,
                                                           **kw))[0].outputs[0]
    return out.token_ids, out.finish_reason


def first_new(tokens: list[int], avoid: set[int]) -> int:
    """Index of the first token that is not in ``avoid`` and not seen before it."""
    return next(k for k, t in enumerate(tokens) if t not in avoid and t not in tokens[:k])


@pytest.mark.parametrize("where", ["config.json", "generation_config.json"])
def test_every_eos_id_stops_generation(llama, prompts, where):
    """An eos list in config.json, or generation_config.json's eos ids, end generation at
    the first token in the set, with finish_reason "stop"."""
    free, reason = greedy_tokens(llama, prompts[2], ignore_eos=True)
    assert reason == "length"
    k = first_new(free, {1, 2})
    edit_json(llama / where, eos_token_id=[2, free[k]])
    stopped, reason = greedy_tokens(llama, prompts[2])
    assert (stopped, reason) == (free[:k + 1], "stop")
    # min_tokens keeps every eos id out until it is reached
    held, _ = greedy_tokens(llama, prompts[2], min_tokens=k + 1)
    assert held[k] != free[k]


def test_generation_config_sampling_defaults(llama):
    llm = LLM(str(llama))
    assert llm.engine.info.sampling_defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    p = llm.get_default_sampling_params()
    assert (p.temperature, p.top_p, p.top_k) == (0.6, 0.9, 20)
    assert LLM(str(llama), generation_config="vllm").engine.info.sampling_defaults == {}


def test_generation_config_folder(llama, tmp_path):
    folder = tmp_path / "gen"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.3}))
    llm = LLM(str(llama), generation_config=str(folder))
    assert llm.engine.info.sampling_defaults == {"temperature": 0.3}
    with pytest.raises(CheckpointError, match="generation_config.json"):
        LLM(str(llama), generation_config=str(tmp_path / "nowhere"))


def test_bad_generation_config_is_named(llama):
    edit_json(llama / "generation_config.json", temperature=7.0)
    with pytest.raises(CheckpointError, match=r"generation_config\.json.*temperature"):
        load_model(llama)


def test_config_round_trips_with_its_features(dirs):
    """An HF model's features survive this project's config format (upcycling writes it)."""
    for d in dirs.values():
        model, _ = load_model(d)
        assert ModelConfig.from_dict(model.cfg.to_dict()) == model.cfg
    qwen, _ = load_model(dirs["qwen2-biases"])
    assert qwen.cfg.qkv_bias and qwen.layers[0].block.q_proj.bias is not None


def test_fused_projections_keep_the_biases(dirs, prompts):
    plain, _ = load_model(dirs["qwen2-biases"])
    fused, _ = load_model(dirs["qwen2-biases"], fuse=True)
    ids = torch.tensor([prompts[3]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, fused(ids).logits, atol=1e-5)


# ---- sliding windows --------------------------------------------------------------------------
@pytest.mark.parametrize("family,extra", [("mistral", {}), ("qwen2",
                                                          {"use_sliding_window": True})])
def test_sliding_window_beyond_the_served_context_is_refused(family, extra, tokenizer_file,
                                                              tmp_path, prompts):
    d = build_hf_model(tmp_path / family, family, tokenizer_file=tokenizer_file)
    edit_json(d / "config.json", sliding_window=64, **extra)
    with pytest.raises(ConfigError, match=r"'sliding_window' 64.*--max-model-len 64"):
        LLM(str(d))
    out = LLM(str(d), max_model_len=64).generate(
        [prompts[2]], SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert len(out.outputs[0].token_ids) >= 1


# ---- bad input ----------------------------------------------------------------------------
@pytest.fixture
def sharded(tokenizer_file, tmp_path) -> Path:
    return build_hf_model(tmp_path / "s", tokenizer_file=tokenizer_file, max_shard_size="60KB")


def rejects(path: Path, *patterns: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    msg = str(info.value)
    for p in patterns:
        assert re.search(p, msg), f"{p!r} not in {msg!r}"
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("change,patterns", [
    ({"architectures": ["GPT2LMHeadModel"]}, ["config.json", "architecture",
                                              "GPT2LMHeadModel"]),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None},
     ["config.json", "rope_scaling", "'yarn'"]),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     ["config.json", "rope_scaling", "'dynamic'"]),
    ({"hidden_act": "gelu"}, ["config.json", "hidden_act", "gelu"]),
    ({"mlp_bias": True}, ["config.json", "mlp_bias"]),
    ({"num_hidden_layers": "two"}, ["config.json", "num_hidden_layers"]),
    ({"head_dim": 32}, ["model-0000\\d-of-0000\\d.safetensors", "[qk]_proj.weight", "shape"]),
    ({"intermediate_size": 96}, ["model-0000\\d-of-0000\\d.safetensors", "proj.weight",
                                 "shape", r"\[96, 64\]|\[64, 96\]"]),
])
def test_bad_config(sharded, change, patterns):
    edit_json(sharded / "config.json", **change)
    rejects(sharded, *patterns)


def test_missing_shard(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    rejects(sharded, "model.safetensors.index.json", re.escape(shard.name), "missing")


def test_index_naming_a_tensor_no_shard_has(sharded):
    index = sharded / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    shard = raw["weight_map"]["model.norm.weight"]
    raw["weight_map"]["model.layers.0.mlp.extra.weight"] = shard
    index.write_text(json.dumps(raw))
    rejects(sharded, "model.safetensors.index.json", "model.layers.0.mlp.extra.weight",
            re.escape(shard))


def test_missing_required_tensor(sharded):
    """An untied model without lm_head.weight: named, in transformers' spelling."""
    index = sharded / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    del raw["weight_map"]["lm_head.weight"]
    index.write_text(json.dumps(raw))
    rejects(sharded, "missing tensor", "lm_head.weight")


def test_no_weights_at_all(sharded):
    (sharded / "model.safetensors.index.json").unlink()
    rejects(sharded, "missing", "model.safetensors")
