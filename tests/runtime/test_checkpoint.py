"""Checkpoint format (ITT_SPEC "Checkpoint format"): exact round trip, and every malformed
directory rejected with a CheckpointError that names the problem."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import itt_runtime
from itt_runtime.checkpoints import DEFAULT_MODEL_DIR, resolve_model_path
from itt_runtime.config import CheckpointError, ConfigError, ModelConfig
from itt_runtime.model.loader import FILES, load_model, save_model


@pytest.fixture(scope="module")
def good_dir(tiny_model_dir) -> Path:
    """A valid calibrated ITT model directory (never modified: tests break copies)."""
    return tiny_model_dir


@pytest.fixture
def ckpt(good_dir, tmp_path) -> Path:
    """A private copy of the good directory for a test to break."""
    return Path(shutil.copytree(good_dir, tmp_path / "model"))


def edit_config(path: Path, **changes) -> None:
    raw = json.loads((path / "config.json").read_text())
    raw.update(changes)
    (path / "config.json").write_text(json.dumps(raw))


def edit_tensors(path: Path, fn) -> None:
    state = load_file(str(path / "model.safetensors"))
    fn(state)
    save_file(state, str(path / "model.safetensors"))


def rejects(path: Path, *patterns: str) -> CheckpointError:
    """load_model(path) must raise CheckpointError whose message matches every pattern."""
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    msg = str(info.value)
    for p in patterns:
        assert re.search(p, msg), f"{p!r} not in error message: {msg}"
    return info.value


def sample_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(3, vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))


# ---- round trip -----------------------------------------------------------------------------
def test_save_load_round_trip_is_exact(good_dir, tokenizer_file, tmp_path):
    model, tok = load_model(good_dir)
    assert not model.training
    assert model.cfg.is_itt and model.cfg.calibration is not None
    out = save_model(model, tokenizer_file, tmp_path / "again")
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES, "tokenizer_config.json"])
    again, tok2 = load_model(out)

    assert again.cfg == model.cfg
    assert again.cfg.to_dict() == model.cfg.to_dict()
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32, k
        assert torch.equal(a[k], b[k]), k
    assert tok2.vocab_size == tok.vocab_size
    ids = sample_ids(model.cfg.vocab_size)
    with torch.no_grad():
        x, y = model(ids), again(ids)
    assert torch.equal(x.logits, y.logits)
    assert torch.equal(x.routed, y.routed)


def test_bf16_save_round_trips_the_rounded_weights(good_dir, tokenizer_file, tmp_path):
    model, _ = load_model(good_dir)
    out = save_model(model, tokenizer_file, tmp_path / "bf16", dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in load_file(str(out / "model.safetensors"))
               .values())
    again, _ = load_model(out)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v.to(torch.bfloat16).float()), k


def test_free_form_underscore_notes_survive_a_round_trip(ckpt, tokenizer_file, tmp_path):
    edit_config(ckpt, _note="trained on the held-out slice")
    model, _ = load_model(ckpt)
    assert model.cfg.extra == {"_note": "trained on the held-out slice"}
    out = save_model(model, tokenizer_file, tmp_path / "noted")
    assert json.loads((out / "config.json").read_text())["_note"] == \
        "trained on the held-out slice"


# ---- the default model ----------------------------------------------------------------------
def test_default_resolves_to_the_packaged_model_directory():
    packaged = Path(itt_runtime.__file__).resolve().parent / "checkpoints" / "default"
    assert DEFAULT_MODEL_DIR == packaged
    assert resolve_model_path(None) == packaged
    assert resolve_model_path("default") == packaged
    assert resolve_model_path("some/dir") == Path("some/dir")


def test_load_model_without_argument_loads_the_default_model():
    if not all((DEFAULT_MODEL_DIR / f).is_file() for f in FILES):
        pytest.skip(f"{DEFAULT_MODEL_DIR} is not there yet (the default model is trained "
                    "separately)")
    model, tok = load_model()
    assert tok.vocab_size <= model.cfg.vocab_size
    ids = torch.tensor([tok.encode("The quick brown fox")])
    with torch.no_grad():
        out = model(ids)
    assert out.logits.shape == (1, ids.shape[1], model.cfg.vocab_size)
    assert torch.isfinite(out.logits).all()


# ---- malformed directories ------------------------------------------------------------------
def test_checkpoint_error_is_a_config_and_value_error():
    assert issubclass(CheckpointError, ConfigError)
    assert issubclass(CheckpointError, ValueError)


def test_missing_directory(tmp_path):
    rejects(tmp_path / "nope", "nope", "does not exist")


@pytest.mark.parametrize("name", FILES)
def test_missing_file(ckpt, name):
    (ckpt / name).unlink()
    rejects(ckpt, "missing", re.escape(name))


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "itt", d_model: 64')
    rejects(ckpt, "config.json", "not valid JSON")


def test_config_not_an_object(ckpt):
    (ckpt / "config.json").write_text("[1, 2, 3]")
    rejects(ckpt, "config.json", "JSON object")


@pytest.mark.parametrize("model_type", ["llama", None, ""])
def test_wrong_model_type(ckpt, model_type):
    edit_config(ckpt, model_type=model_type)
    rejects(ckpt, "model_type", "itt")


def test_missing_model_type(ckpt):
    raw = json.loads((ckpt / "config.json").read_text())
    del raw["model_type"]
    (ckpt / "config.json").write_text(json.dumps(raw))
    rejects(ckpt, "model_type")


def test_unknown_config_key(ckpt):
    edit_config(ckpt, hidden_sizze=64)
    rejects(ckpt, "unknown", "hidden_sizze")


@pytest.mark.parametrize("changes, pattern", [
    ({"d_model": -64}, r"'d_model' must be a positive integer"),
    ({"d_model": 0}, r"'d_model' must be a positive integer"),
    ({"d_model": 64.0}, r"'d_model' must be a positive integer"),
    ({"n_layers": "4"}, r"'n_layers' must be a positive integer"),
    ({"n_heads": 6}, r"'d_model' \(64\) must be divisible by 'n_heads' \(6\)"),
    ({"n_kv_heads": 3}, r"'n_heads' \(4\) must be divisible by 'n_kv_heads' \(3\)"),
    ({"itt_layers": [1, 4]}, r"'itt_layers' entry 4 is not a layer index in \[0, 4\)"),
    ({"itt_layers": [-1, 3]}, r"'itt_layers' entry -1"),
    ({"itt_layers": [1, 1]}, r"'itt_layers' has duplicates"),
    ({"itt_layers": "odd"}, r"'itt_layers' must be a list"),
    ({"itt_layers": [[1], 3]}, r"'itt_layers'"),
    ({"train_capacity": 0}, r"'train_capacity' must be in \(0, 1\]"),
    ({"train_capacity": 1.5}, r"'train_capacity' must be in \(0, 1\]"),
    ({"train_capacity": -0.2}, r"'train_capacity'"),
    ({"train_capacity": "0.5"}, r"'train_capacity'"),
    ({"default_think_budget": 2.0}, r"'default_think_budget'"),
    ({"rope_theta": -1.0}, r"'rope_theta' must be positive"),
    ({"rope_theta": "10000"}, r"'rope_theta'"),
    ({"norm_eps": None}, r"'norm_eps'"),
    ({"tie_embeddings": "false"}, r"'tie_embeddings'"),
    ({"think_steps": 0}, r"'think_steps' must be a positive integer"),
])
def test_bad_config_values(ckpt, changes, pattern):
    edit_config(ckpt, **changes)
    rejects(ckpt, "config.json", pattern)


def calibration_variants(cal: dict) -> dict:
    """Ways to get the calibration wrong, derived from a good one (2 ITT layers, 2 steps)."""
    th = cal["thresholds"]
    return {
        "one ITT layer short": {**cal, "thresholds": th[:1]},
        "one step short": {**cal, "thresholds": [steps[:1] for steps in th]},
        "one budget short": {**cal, "thresholds": [[row[:-1] for row in s] for s in th]},
        "ragged rows": {**cal, "thresholds": [th[0], [th[1][0], th[1][1][:-1]]]},
        "budgets longer than rows": {**cal, "budgets": cal["budgets"] + [0.99]},
        "no thresholds key": {"budgets": cal["budgets"]},
        "thresholds not a list": {**cal, "thresholds": 3},
        "not an object": [1, 2, 3],
        "budgets not increasing": {**cal, "budgets": cal["budgets"][::-1]},
        "budgets empty": {"budgets": [], "thresholds": [[[], []], [[], []]]},
    }


@pytest.mark.parametrize("variant", list(calibration_variants(
    {"budgets": [0.1, 0.2], "thresholds": [[[0, 0], [0, 0]], [[0, 0], [0, 0]]]})))
def test_calibration_of_the_wrong_shape(ckpt, variant):
    cal = json.loads((ckpt / "config.json").read_text())["calibration"]
    assert len(cal["thresholds"]) == 2 and len(cal["thresholds"][0]) == 2
    edit_config(ckpt, calibration=calibration_variants(cal)[variant])
    rejects(ckpt, "config.json", "calibration")


def test_tensor_with_wrong_shape(ckpt):
    key = "layers.1.block.q_proj.weight"
    edit_tensors(ckpt, lambda s: s.__setitem__(key, torch.zeros(64, 32)))
    rejects(ckpt, "model.safetensors", re.escape(repr(key)), r"shape \[64, 32\]",
            r"\[64, 64\]")


def test_weights_of_another_config(ckpt):
    # Same tensors, but config.json claims a wider MLP: every MLP weight is the wrong shape.
    edit_config(ckpt, ffn_dim=256)
    rejects(ckpt, "model.safetensors", "shape", "proj.weight")


def test_unknown_tensor_key(ckpt):
    edit_tensors(ckpt, lambda s: s.__setitem__("layers.0.block.extra_bias", torch.zeros(64)))
    rejects(ckpt, "unknown tensor", "layers.0.block.extra_bias")


@pytest.mark.parametrize("key", ["layers.1.routers.0.weight", "layers.3.phi", "norm.weight"])
def test_missing_tensor(ckpt, key):
    edit_tensors(ckpt, lambda s: s.pop(key))
    rejects(ckpt, "missing tensor", re.escape(key))


def test_think_steps_disagreeing_with_the_weights(ckpt):
    edit_config(ckpt, think_steps=4, calibration=None)   # weights have 2 routers, φ of 3 rows
    rejects(ckpt, "model.safetensors", r"layers\.[13]\.")


@pytest.mark.parametrize("bad", ["nan", "int"])
def test_non_finite_or_non_float_tensor(ckpt, bad):
    key = "layers.0.block.up_proj.weight"

    def fn(s):
        s[key] = s[key].clone()
        if bad == "nan":
            s[key][0, 0] = float("nan")
        else:
            s[key] = s[key].to(torch.int32)
    edit_tensors(ckpt, fn)
    rejects(ckpt, re.escape(repr(key)), "finite floating point")


@pytest.mark.parametrize("content", [b"", b"\x00\x01 not a safetensors file" * 20])
def test_unreadable_safetensors(ckpt, content):
    (ckpt / "model.safetensors").write_bytes(content)
    rejects(ckpt, "model.safetensors", "unreadable")


@pytest.mark.parametrize("content", [b"", bytes(range(256)) * 8])
def test_tokenizer_of_garbage_bytes(ckpt, content):
    (ckpt / "tokenizer.model").write_bytes(content)
    rejects(ckpt, "tokenizer.model", "not a sentencepiece model")


def test_tokenizer_with_more_pieces_than_vocab_size(ckpt, tokenizer):
    edit_config(ckpt, vocab_size=tokenizer.vocab_size - 1)
    rejects(ckpt, "tokenizer.model", f"{tokenizer.vocab_size} pieces",
            f"'vocab_size' is {tokenizer.vocab_size - 1}")


def test_model_config_rejects_bad_values_directly():
    # The same validation guards configs built in code (e.g. by the trainer).
    with pytest.raises(ConfigError, match="'n_kv_heads'"):
        ModelConfig(n_kv_heads=0)
    with pytest.raises(ConfigError, match="'itt_layers' entry 8"):
        ModelConfig(n_layers=8, itt_layers=(1, 8), think_steps=2)
