"""loadtest/export_llama.py: a dense checkpoint exported as a Hugging Face Llama directory
computes exactly what our model and engine compute (transformers loads it); an ITT
checkpoint gets φ_0 folded into o_proj and down_proj."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import LlamaForCausalLM

from itt_runtime.llm import LLM
from itt_runtime.model.loader import load_model, save_model
from itt_runtime.sampling_params import SamplingParams
from loadtest.export_llama import ExportError, export, hf_config


def test_dense_export_matches_engine_and_reference(tiny_dense_dir, tmp_path):
    out = export(tiny_dense_dir, tmp_path / "llama")
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors",
                                               "tokenizer.model", "tokenizer_config.json"}
    hf = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ours, _ = load_model(tiny_dense_dir)
    ids = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64, 12, 5]])
    with torch.no_grad():
        theirs = hf(ids).logits
        mine = ours(ids).logits
    assert (theirs - mine).abs().max() <= 1e-4
    # Greedy continuation: the engine's tokens = transformers' generate.
    prompt = ids[0].tolist()
    got = LLM(str(tiny_dense_dir)).generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    want = hf.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert got[0].outputs[0].token_ids == want[0, len(prompt):].tolist()


def test_itt_export_folds_phi0(tiny_model_dir, tokenizer_file, tmp_path):
    model, _ = load_model(tiny_model_dir)
    with torch.no_grad():               # a φ_0 that is not all ones, so the fold shows
        for layer in model.itt_layer_list:
            if layer.think_steps > 1:
                layer.phi[0].uniform_(0.5, 1.5)
    src = save_model(model, tokenizer_file, tmp_path / "itt")
    out = export(src, tmp_path / "llama")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == model.cfg.n_layers and cfg["model_type"] == "llama"
    hf = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    i = model.cfg.itt_layers[0]
    layer = model.itt_layer_list[i]
    for ours, theirs in ((layer.block.o_proj, hf.model.layers[i].self_attn.o_proj),
                         (layer.block.down_proj, hf.model.layers[i].mlp.down_proj)):
        assert torch.allclose(theirs.weight, layer.phi[0][:, None] * ours.weight)
    dense = next(j for j in range(model.cfg.n_layers) if j not in model.cfg.itt_layers)
    assert torch.equal(hf.model.layers[dense].self_attn.o_proj.weight,
                       model.itt_layer_list[dense].block.o_proj.weight)


def test_unsupported_feature_is_named(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    with pytest.raises(ExportError, match="qkv_bias"):
        hf_config(replace(model.cfg, qkv_bias=True), "float32")
