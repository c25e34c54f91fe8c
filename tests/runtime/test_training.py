"""itt-train end to end on a tiny config: a complete model directory, exact resume, itt-eval."""

from __future__ import annotations

import json

import torch
from itt_testing import HELDOUT

from itt_runtime.model.loader import load_model
from itt_runtime.training.cli import main as itt_train
from itt_runtime.training.evaluate import main as itt_eval

TINY = ["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--n-kv-heads", "1",
        "--ffn-dim", "64", "--seq-len", "32", "--batch-size", "4", "--max-steps", "6",
        "--warmup-steps", "2", "--eval-every", "3", "--eval-batches", "2",
        "--checkpoint-every", "100", "--max-positions", "128", "--think-steps", "3",
        "--itt-layers", "1", "--ship-dtype", "float32", "--no-bf16"]


def train(tmp_path, name, tokenizer_file, *extra):
    out = tmp_path / name
    rc = itt_train(["--train", str(HELDOUT), "--heldout", str(HELDOUT), "--out", str(out),
                    "--tokenizer", str(tokenizer_file), *TINY, *extra])
    assert rc == 0
    return out


def test_train_writes_a_complete_calibrated_model(tmp_path, tokenizer_file):
    out = train(tmp_path, "m", tokenizer_file)
    model, tok = load_model(out)
    cfg = model.cfg
    assert cfg.itt_layers == (1,) and cfg.think_steps == 3
    assert cfg.calibration is not None and len(cfg.calibration.thresholds[0]) == 2
    history = cfg.extra["_training"]["history"]
    assert [h["step"] for h in history] == [3, 6]
    assert history[-1]["eval_loss"] < history[0]["eval_loss"] + 1.0


def test_resume_gives_the_same_weights(tmp_path, tokenizer_file):
    straight = train(tmp_path, "a", tokenizer_file)
    work = tmp_path / "b.work"
    train(tmp_path, "b", tokenizer_file, "--stop-at", "3")
    assert (work / "state.pt").exists() and not (tmp_path / "b").exists()
    resumed = train(tmp_path, "b", tokenizer_file)
    m1, _ = load_model(straight)
    m2, _ = load_model(resumed)
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(v1, v2), k


def test_itt_eval_json_rows(tmp_path, tokenizer_file, capsys):
    out = train(tmp_path, "m", tokenizer_file)
    capsys.readouterr()
    assert itt_eval(["--model", str(out), "--text", str(HELDOUT), "--seq-len", "64",
                     "--budgets", "0,0.5,1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["rows"]
    assert [r["budget"] for r in rows] == [0.0, 0.5, 1.0]
    assert set(rows[0]) >= {"budget", "ppl", "routed_fraction", "mean_extra_steps"}
    assert rows[0]["mean_extra_steps"] == 0 and rows[2]["mean_extra_steps"] == 2
    assert rows[2]["routed_fraction"] == [1.0, 1.0]
    assert abs(rows[1]["routed_fraction"][0] - 0.5) < 0.15
    assert report["paper_mode"]["ppl"] > 0


def test_itt_eval_reports_bad_input_without_traceback(tmp_path, capsys):
    assert itt_eval(["--model", str(tmp_path / "nope"), "--text", str(HELDOUT)]) == 2
    assert "does not exist" in capsys.readouterr().err
