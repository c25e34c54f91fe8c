"""itt-upcycle and itt-train --init (docs/ITT_SPEC.md "Upcycling a dense model"): the upcycled
model computes the dense model's function at every budget, through the reference forward and
through the engine; training from it moves φ and the routers (and only them during a router
warm-up), and calibration keeps the budget honest. Tiny fp32 models on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from itt_testing import HELDOUT

from itt_runtime.llm import LLM
from itt_runtime.model.itt import ThresholdRouting
from itt_runtime.model.loader import load_model
from itt_runtime.sampling_params import SamplingParams
from itt_runtime.training.cli import main as itt_train
from itt_runtime.training.evaluate import main as itt_eval
from itt_runtime.training.upcycle import main as itt_upcycle

BUDGETS = [0.0, 0.5, 1.0]
TRAIN = ["--seq-len", "32", "--batch-size", "4", "--warmup-steps", "1", "--eval-every", "100",
         "--eval-batches", "2", "--checkpoint-every", "100", "--ship-dtype", "float32",
         "--no-bf16", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def upcycled_dir(tiny_dense_dir, small_text, tmp_path_factory):
    """The tiny dense model upcycled: layers 1 and 3 as ITT ×3, calibrated on held-out text
    so that budget 0.5 routes about half the tokens (a real mid budget, not the uncalibrated
    θ = 0)."""
    out = tmp_path_factory.mktemp("up") / "m"
    assert itt_upcycle([str(tiny_dense_dir), str(out), "--itt-layers", "1,3", "--think-steps",
                        "3", "--calib", str(small_text), "--calib-seq-len", "64"]) == 0
    return out


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    """A slice of the held-out text: enough for a few steps, calibration and itt-eval."""
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text("\n".join(HELDOUT.read_text().splitlines()[:120]) + "\n")
    return path


@pytest.fixture(scope="module")
def prompts(tokenizer):
    lines = [ln for ln in HELDOUT.read_text().splitlines() if len(ln) > 200]
    return [tokenizer.encode(ln)[:n] for ln, n in zip(lines[:4], (7, 40, 90, 150))]


def test_upcycled_config_and_files(upcycled_dir, tiny_dense_dir):
    cfg = json.loads((upcycled_dir / "config.json").read_text())
    assert cfg["model_type"] == "itt" and cfg["itt_layers"] == [1, 3]
    assert cfg["think_steps"] == 3 and cfg["train_capacity"] == 0.6
    assert cfg["calibration"] is not None
    assert (upcycled_dir / "tokenizer.model").read_bytes() == \
        (tiny_dense_dir / "tokenizer.model").read_bytes()
    model, _ = load_model(upcycled_dir)
    for i in (1, 3):
        phi = model.itt_layer_list[i].phi
        assert torch.equal(phi[0], torch.ones_like(phi[0]))
        assert torch.equal(phi[1:], torch.zeros_like(phi[1:]))


def test_reference_logits_equal_dense_at_every_budget(upcycled_dir, tiny_dense_dir, prompts):
    dense, _ = load_model(tiny_dense_dir)
    up, _ = load_model(upcycled_dir)
    ids = torch.tensor([p[:40] for p in prompts[1:]])                  # (3, 40)
    want = dense(ids).logits
    for b in BUDGETS:
        out = up(ids, routing=ThresholdRouting.for_budgets(up.cfg, [b] * len(ids)))
        err = (out.logits - want).abs().max().item()
        assert err <= 1e-5, f"budget {b}: max abs error {err}"
        # The routed steps really ran: the equality is not from routing nothing.
        frac = out.routed.float().mean().item()
        assert abs(frac - b) < 0.2, f"budget {b}: routed fraction {frac}"


def engine_logits(model_dir, prompts, budget):
    """Every sampled row's logits through the engine, one request at a time."""
    llm = LLM(str(model_dir))
    seen: list[torch.Tensor] = []
    forward = llm.engine.runner.forward
    real_execute = forward.execute

    def recording_execute(batch):
        out = real_execute(batch)
        seen.append(out.logits.clone())
        return out

    forward.execute = recording_execute
    params = SamplingParams(max_tokens=5, temperature=0.0, think_budget=budget, ignore_eos=True)
    tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    return torch.cat([s for s in seen if s.shape[0]]), tokens


@pytest.fixture(scope="module")
def dense_engine(tiny_dense_dir, prompts):
    return engine_logits(tiny_dense_dir, prompts, 0.0)


@pytest.mark.parametrize("budget", BUDGETS)
def test_engine_logits_equal_dense(upcycled_dir, dense_engine, prompts, budget):
    dense_logits, dense_tokens = dense_engine
    up_logits, up_tokens = engine_logits(upcycled_dir, prompts, budget)
    assert up_tokens == dense_tokens
    assert up_logits.shape == dense_logits.shape
    err = (up_logits - dense_logits).abs().max().item()
    assert err <= 1e-5, f"budget {budget}: max abs error {err}"


@pytest.mark.parametrize("args, message", [
    (["--think-steps", "1"], "--think-steps must be at least 2"),
    (["--itt-layers", "1,4"], "layer index 4 is out of range"),
    (["--itt-layers", "odd,1"], "--itt-layers must be odd, even, all or a list"),
])
def test_bad_arguments_one_line_no_traceback(tiny_dense_dir, tmp_path, capsys, args, message):
    assert itt_upcycle([str(tiny_dense_dir), str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_already_itt_source_is_refused(tiny_model_dir, tmp_path, capsys):
    assert itt_upcycle([str(tiny_model_dir), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "already an ITT model" in err and err.count("\n") == 1


def itt_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if n.endswith(".phi") or ".routers." in n}


def test_router_warmup_trains_only_phi_and_routers(upcycled_dir, small_text, tmp_path):
    out = tmp_path / "warm"
    assert itt_train(["--init", str(upcycled_dir), "--train", str(small_text), "--heldout",
                      str(small_text), "--out", str(out), "--max-steps", "2",
                      "--router-warmup-steps", "2", *TRAIN]) == 0
    before, _ = load_model(upcycled_dir)
    after, _ = load_model(out)
    new_before, new_after = itt_params(before), itt_params(after)
    for (name, p0), p1 in zip(before.named_parameters(), after.parameters()):
        if name in new_before:
            assert not torch.equal(p0, p1), f"{name} did not move"
        else:
            assert torch.equal(p0, p1), f"backbone tensor {name} changed during the warm-up"
    assert set(new_before) == set(new_after)


def test_training_from_upcycled_moves_routers_and_keeps_budgets_honest(upcycled_dir, small_text,
                                                                       tmp_path, capsys):
    out = tmp_path / "trained"
    assert itt_train(["--init", str(upcycled_dir), "--train", str(small_text), "--heldout",
                      str(small_text), "--out", str(out), "--max-steps", "4",
                      "--router-warmup-steps", "1", "--itt-lr-mult", "3", *TRAIN]) == 0
    before, _ = load_model(upcycled_dir)
    after, _ = load_model(out)
    assert after.cfg.itt_layers == (1, 3) and after.cfg.calibration is not None
    p0, p1 = itt_params(before), itt_params(after)
    for name in p0:
        assert not torch.equal(p0[name], p1[name]), f"{name} is still at its initial value"
    for i in (1, 3):
        assert after.itt_layer_list[i].phi[1:].abs().max() > 0            # φ_t left zero
    capsys.readouterr()
    # Budget honesty (ITT_SPEC): measured routed fraction within ±0.05 of the budget, on the
    # windows the trainer calibrated on (its --heldout, at its --seq-len).
    assert itt_eval(["--model", str(out), "--text", str(small_text), "--seq-len", "32",
                     "--budgets", "0,0.25,0.5,0.75,1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    for r in rows:
        for f in r["routed_fraction"]:
            assert abs(f - r["budget"]) <= 0.05, (r["budget"], r["routed_fraction"])


def test_init_from_dense_continues_dense(tiny_dense_dir, small_text, tmp_path):
    out = tmp_path / "dense2"
    assert itt_train(["--init", str(tiny_dense_dir), "--train", str(small_text), "--heldout",
                      str(small_text), "--out", str(out), "--max-steps", "2", "--d-model", "64",
                      *TRAIN]) == 0                       # an agreeing shape flag is fine
    before, _ = load_model(tiny_dense_dir)
    after, _ = load_model(out)
    assert after.cfg.itt_layers == () and after.cfg.d_model == 64
    assert not torch.equal(before.embed_tokens.weight, after.embed_tokens.weight)
    assert after.cfg.extra["_training"]["init"] == str(tiny_dense_dir)


def test_init_with_conflicting_shape_flag_is_an_error(tiny_dense_dir, small_text, tmp_path,
                                                    capsys):
    rc = itt_train(["--init", str(tiny_dense_dir), "--train", str(small_text), "--heldout",
                    str(small_text), "--out", str(tmp_path / "x"), "--d-model", "128",
                    "--itt-layers", "odd", *TRAIN])
    err = capsys.readouterr().err
    assert rc == 2 and "--d-model 128 (the checkpoint has 64)" in err
    assert "--itt-layers odd (the checkpoint has [])" in err and "Traceback" not in err


@pytest.mark.parametrize("family, kw", [("llama", {"max_shard_size": "60KB"}),
                                        ("qwen2", {"tied": True})])
def test_hugging_face_source(family, kw, tokenizer_file, tmp_path):
    """A transformers-saved Llama (sharded, untied) or Qwen2 (q/k/v biases, tied) upcycles to
    a model of this project's format that equals transformers' logits at every budget."""
    from hf_models import build_hf_model, hf_logits, load_hf

    src = build_hf_model(tmp_path / "hf", family, tokenizer_file=tokenizer_file, **kw)
    out = tmp_path / "up"
    assert itt_upcycle([str(src), str(out), "--itt-layers", "1", "--think-steps", "3"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "itt"
    assert (out / "generation_config.json").is_file()
    up, tok = load_model(out)
    ids = tok.encode(HELDOUT.read_text().splitlines()[3])[:48]
    want = hf_logits(load_hf(src), ids)                                 # (T, vocab)
    for b in BUDGETS:
        got = up(torch.tensor([ids]), routing=ThresholdRouting.for_budgets(up.cfg, [b])).logits[0]
        err = (got - want).abs().max().item()
        assert err <= 1e-4, f"{family} budget {b}: max abs error {err}"
