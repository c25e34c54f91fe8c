"""Arithmetic in an instruct model's chat format and task fine-tuning from a checkpoint
(issue 30): the chat prompt is the one transformers renders, the LM head runs on the answer
positions only, only the chosen layers train, and the result is calibrated, recorded and
evaluated in the format it was trained on. Tiny random Hugging Face models on CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hf_models import build_hf_chat_model
from hf_tokenizers import LLAMA3, hf_reference
from itt_testing import REPO

from itt_runtime.model.loader import load_model
from itt_runtime.training import tasks
from itt_runtime.training.arith_eval import main as arith_eval
from itt_runtime.training.chat_tasks import ChatFormat, question
from itt_runtime.training.cli import main as itt_train
from itt_runtime.training.task_trainer import IGNORE, encode_problems
from itt_runtime.training.upcycle import main as itt_upcycle

TASK = ["--task", "arith", "--task-format", "chat", "--max-steps", "3", "--batch-size", "4",
        "--eval-every", "3", "--eval-problems", "4", "--max-add-digits", "2",
        "--no-curriculum", "--warmup-steps", "1", "--lr", "1e-2", "--ship-dtype", "float32"]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return build_hf_chat_model(tmp_path_factory.mktemp("chat") / "dense", LLAMA3)


@pytest.fixture(scope="module")
def itt_chat_dir(chat_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat_itt") / "itt"
    assert itt_upcycle([str(chat_dir), str(out), "--itt-layers", "1", "--think-steps", "3",
                        "--train-capacity", "0.75"]) == 0
    return out


def test_question_wording():
    assert question(tasks.Problem("add", 3, "4821+397=", "5218")) == "What is 4821 + 397?"
    assert question(tasks.Problem("mul", 3, "482*7=", "3374")) == "What is 482 * 7?"


def test_chat_prompt_is_what_transformers_renders(chat_dir):
    _, tok = load_model(chat_dir)
    fmt = ChatFormat(tok)
    p = tasks.Problem("add", 2, "12+34=", "46")
    ref = hf_reference(chat_dir)
    text = ref.apply_chat_template([{"role": "user", "content": "What is 12 + 34?"}],
                                   add_generation_prompt=True, tokenize=False)
    want = ref(text, add_special_tokens=False)["input_ids"]
    assert fmt.prompt_ids(p) == list(want)
    assert fmt.answer_ids(p)[-1] == tok.eos_token_id
    assert tok.decode(fmt.answer_ids(p)) == "46"
    ids, tgt, lengths = encode_problems(fmt, [p])
    answer = tgt[0][tgt[0] != IGNORE].tolist()
    assert answer == fmt.answer_ids(p) and int(lengths[0]) == len(want) + len(answer) - 1


def test_logits_at_equals_the_full_logits_there(itt_chat_dir):
    model, _ = load_model(itt_chat_dir)
    ids = torch.randint(0, 500, (3, 12))
    at = torch.rand(3, 12) < 0.3
    at[0, -1] = True
    with torch.no_grad():
        full = model(ids).logits
        some = model(ids, logits_at=at).logits
    assert some.shape == (int(at.sum()), full.shape[-1])
    torch.testing.assert_close(some, full[at], rtol=0, atol=1e-5)


def changed_layers(before, after) -> set[str]:
    a, b = before.state_dict(), after.state_dict()
    return {k for k in a if not torch.equal(a[k], b[k])}


@pytest.fixture(scope="module")
def trained_itt(itt_chat_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "itt"
    assert itt_train(["--init", str(itt_chat_dir), "--out", str(out), *TASK,
                      "--trainable-layers", "itt", "--itt-lr-mult", "10",
                      "--calib-problems", "300"]) == 0
    return out


def test_fine_tune_itt_layers_only_then_evaluate_in_chat_format(itt_chat_dir, trained_itt,
                                                                 tmp_path):
    out = trained_itt
    before, _ = load_model(itt_chat_dir)
    after, _ = load_model(out)
    changed = changed_layers(before, after)
    assert changed and all(k.startswith("layers.1.") for k in changed), sorted(changed)[:5]
    assert "layers.1.phi" in changed and "layers.1.routers.0.weight" in changed
    record = after.cfg.extra["_training"]
    assert record["format"] == "chat" and record["train_config"]["trainable_layers"] == [1]
    assert after.cfg.calibration is not None
    js = tmp_path / "eval.json"
    assert arith_eval(["--model", str(out), "--settings", "add2", "--n", "20", "--budgets",
                       "0,1", "--engine-check", "4", "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["itt"]
    assert [r["budget"] for r in rows] == [0.0, 1.0]
    for r in rows:
        assert r["problems"] == 20 and 0 <= r["stderr"] <= 0.5 + 1e-9
        assert r["engine_agree"] == "4/4"           # the engine, in the chat format, agrees


def test_dense_control_trains_the_same_layers(chat_dir, tmp_path):
    out = tmp_path / "dense"
    assert itt_train(["--init", str(chat_dir), "--out", str(out), *TASK,
                      "--trainable-layers", "1"]) == 0
    before, _ = load_model(chat_dir)
    after, _ = load_model(out)
    changed = changed_layers(before, after)
    assert changed and all(k.startswith("layers.1.") for k in changed)


@pytest.mark.parametrize("args, message", [
    (["--trainable-layers", "itt"], "--trainable-layers itt: the model has no ITT layers"),
    (["--trainable-layers", "7"], "layer index 7 is out of range"),
    (["--d-model", "32"], "fixes the architecture"),
])
def test_bad_fine_tune_arguments_are_one_line(chat_dir, tmp_path, capsys, args, message):
    assert itt_train(["--init", str(chat_dir), "--out", str(tmp_path / "x"), *TASK,
                      *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("itt-train: error:")


def test_chat_format_needs_a_chat_template(tmp_path, capsys):
    no_template = build_hf_chat_model(tmp_path / "plain", chat_template=None)
    assert itt_train(["--init", str(no_template), "--out", str(tmp_path / "x"), *TASK]) == 2
    assert "chat template" in capsys.readouterr().err.strip().splitlines()[-1]


def test_shipped_delta_rebuilds_the_trained_model(trained_itt, chat_dir, tmp_path):
    """scripts/smollm2_arith_delta.py: extract the trained layers (bf16), rebuild from the
    base checkpoint; everything else is the base's, bit for bit, and the delta is the
    trained weights to bf16 precision, recalibrated."""
    script = [sys.executable, str(REPO / "scripts" / "smollm2_arith_delta.py")]
    subprocess.run([*script, "extract", str(trained_itt), str(tmp_path / "delta")], check=True)
    subprocess.run([*script, "build", str(tmp_path / "delta"), str(tmp_path / "built"),
                    "--gguf", str(chat_dir)], check=True)
    trained, _ = load_model(trained_itt)
    built, _ = load_model(tmp_path / "built")
    a, b = trained.state_dict(), built.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith("layers.1."):
            torch.testing.assert_close(b[k], a[k], rtol=2 ** -7, atol=1e-6)
        else:
            assert torch.equal(a[k], b[k]), k
    assert built.cfg.calibration is not None and built.cfg.itt_layers == (1,)
    assert built.cfg.extra["_training"]["format"] == "chat"
