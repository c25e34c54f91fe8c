"""The arithmetic task stream, the task trainer's batches and routing, and itt-train --task."""

from __future__ import annotations

import json

import torch

from itt_runtime.model.loader import load_model
from itt_runtime.tokenizers.tokenizer import Tokenizer
from itt_runtime.training import tasks
from itt_runtime.training.arith_eval import main as arith_eval
from itt_runtime.training.cli import main as itt_train
from itt_runtime.training.task_trainer import (
    IGNORE,
    PaddedTopKRouting,
    PlainFormat,
    encode_problems,
    train_char_tokenizer,
)


def first(split, seed, mix, n=50):
    gen = tasks.stream(split, seed, mix)
    return [next(gen) for _ in range(n)]


def test_stream_is_deterministic_and_seeded():
    mix = tasks.curriculum_mix(1.0, {"add": 4, "mul": 3})
    assert first("train", 0, mix) == first("train", 0, mix)
    assert first("train", 0, mix) != first("train", 1, mix)
    assert first("eval", 0, mix) == first("eval", 0, mix)


def test_formats_and_answers_are_correct():
    mix = {("add", 1): 1.0, ("add", 4): 1.0, ("mul", 3): 1.0}
    for p in first("train", 3, mix, 300):
        assert set(p.text) <= set(tasks.CHARS)
        assert p.prompt.endswith("=")
        op = "+" if p.task == "add" else "*"
        a, b = p.prompt[:-1].split(op)
        assert p.answer == str(int(a) + int(b) if op == "+" else int(a) * int(b))
        assert not p.answer.startswith("0") or p.answer == "0"
        assert max(len(a), len(b)) == p.digits
        if p.task == "mul":
            assert len(a) == p.digits and 2 <= int(b) <= 9


def test_eval_settings_use_exact_digit_counts():
    for p in tasks.take("eval", 0, "add", 3, 200):
        a, b = p.prompt[:-1].split("+")
        assert len(a) == len(b) == 3


def test_splits_are_disjoint_and_take_is_distinct():
    ev = tasks.take("eval", 0, "add", 3, 1000)
    assert len({p.prompt for p in ev}) == 1000
    assert all(tasks.split_of(p.prompt) == "eval" for p in ev)
    train = first("train", 0, {("add", 2): 1.0, ("add", 3): 1.0}, 2000)
    assert all(tasks.split_of(p.prompt) == "train" for p in train)
    # Small spaces are enumerated: every 2-digit eval sum, none of them a training sum.
    two = tasks.take("eval", 0, "add", 2, 10_000)
    assert 300 < len(two) < 500 and not {p.prompt for p in two} & {p.prompt for p in train}


def test_curriculum_opens_digit_counts_by_mid_training():
    assert set(tasks.curriculum_mix(0.0, {"add": 4})) == {("add", 1)}
    assert set(tasks.curriculum_mix(0.5, {"add": 4})) == {("add", d) for d in range(1, 5)}
    assert set(tasks.curriculum_mix(1.0, {"add": 3, "mul": 2})) == {
        ("add", 1), ("add", 2), ("add", 3), ("mul", 1), ("mul", 2)}


def test_cli_prints_problems(capsys):
    assert tasks.main(["--split", "eval", "--digits", "3", "-n", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    prompt, answer = lines[0].split()
    a, b = prompt[:-1].split("+")
    assert int(answer) == int(a) + int(b)


def test_char_tokenizer_and_answer_only_targets(tmp_path):
    tok = Tokenizer(train_char_tokenizer(tmp_path / "tok"))
    assert tok.vocab_size == len(tasks.CHARS) + 3
    assert tok.decode(tok.encode("4821+397=5218")) == "4821+397=5218"
    assert len(tok.encode("4821+397=", add_bos=False)) == 9        # one piece per character
    probs = [tasks.Problem("add", 1, "2+3=", "5"), tasks.Problem("add", 3, "999+1=", "1000")]
    ids, tgt, lengths = encode_problems(PlainFormat(tok), probs)
    assert lengths.tolist() == [6, 11]                              # BOS 2 + 3 = 5 (EOS)
    assert tok.decode([t for t in tgt[0].tolist() if t != IGNORE],
                      skip_special_tokens=False).startswith("5")
    assert (tgt[0] != IGNORE).sum() == 2 and (tgt[1] != IGNORE).sum() == 5
    assert tgt[0, 4].item() == tok.encode("5", add_bos=False)[0]   # "=" predicts the answer
    assert tgt[0, 5].item() == tok.eos_token_id and (tgt[0, 6:] == IGNORE).all()


def test_padded_top_k_never_routes_padding():
    lengths = torch.tensor([4, 8])
    r = PaddedTopKRouting(0.5, lengths, 8)
    logits = torch.arange(16, dtype=torch.float32).reshape(2, 8)   # padding scores highest
    m = r.select(0, logits)
    assert m[0].tolist() == [False, False, True, True] + [False] * 4
    assert m[1].sum() == 4 and m[1, 4:].all()
    assert PaddedTopKRouting(1.0, lengths, 8).select(0, logits).sum() == 12


def test_itt_train_task_writes_a_calibrated_model_and_evaluates(tmp_path, capsys):
    out = tmp_path / "m"
    rc = itt_train(["--task", "arith", "--out", str(out), "--d-model", "32", "--n-layers", "2",
                    "--n-heads", "2", "--n-kv-heads", "1", "--ffn-dim", "64",
                    "--max-positions", "32", "--think-steps", "3", "--itt-layers", "1",
                    "--max-steps", "4", "--batch-size", "8", "--eval-every", "2",
                    "--eval-problems", "5", "--max-add-digits", "2", "--max-mul-digits", "2",
                    "--capacities", "0.5,1", "--ship-dtype", "float32"])
    assert rc == 0
    model, tok = load_model(out)
    assert model.cfg.calibration is not None and model.cfg.vocab_size == len(tasks.CHARS) + 3
    assert model.cfg.extra["_training"]["problems_seen"] == 32
    capsys.readouterr()
    js = tmp_path / "r.json"
    assert arith_eval(["--model", str(out), "--settings", "add2", "--n", "40",
                       "--budgets", "0,0.5,1", "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["itt"]
    assert [r["budget"] for r in rows] == [0.0, 0.5, 1.0]
    assert rows[0]["blocks_per_token"] == 2.0 and rows[2]["blocks_per_token"] == 4.0
    assert abs(rows[1]["routed"] - 0.5) < 0.2
