"""itt-train: train a sentencepiece tokenizer and an ITT (or dense) model from text files,
or (``--task arith``) from the synthetic arithmetic stream of training/tasks.py.

``--init DIR`` continues training from a checkpoint (dense, ITT, or an upcycled dense model,
see training/upcycle.py) with the same schedule, checkpointing and calibration. The
architecture and tokenizer then come from DIR: a shape flag that disagrees with DIR is an
error (as a serving engine refuses a config that contradicts the checkpoint), one that agrees
is accepted. ``--router-warmup-steps K`` trains only φ and the routers for the first K steps,
and ``--itt-lr-mult`` scales their learning rate (see ``optimizer_for`` in trainer.py and
docs/MODEL_CARD_UPCYCLE.md for why an upcycled model wants both)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import sentencepiece as spm
import torch

from itt_runtime.model.itt import ITTModel
from itt_runtime.model.loader import save_model
from itt_runtime.tokenizers.tokenizer import Tokenizer
from itt_runtime.training.arch_flags import ARCH_DEFAULTS, load_init, model_config
from itt_runtime.training.data import encode_corpus, eval_windows
from itt_runtime.training.finish import CalibrationData, finish_run
from itt_runtime.training.task_cli import run_task
from itt_runtime.training.trainer import TrainConfig, train
from itt_runtime.training.upcycle import write_checkpoint


def train_tokenizer(text_files: list[Path], vocab_size: int, out_prefix: Path) -> Path:
    spm.SentencePieceTrainer.train(
        input=",".join(map(str, text_files)), model_prefix=str(out_prefix),
        vocab_size=vocab_size, model_type="bpe", character_coverage=1.0, byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, input_sentence_size=2_000_000,
        shuffle_input_sentence=True, num_threads=2, minloglevel=2)
    return out_prefix.with_suffix(".model")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="itt-train", description=__doc__)
    p.add_argument("--train", type=Path, nargs="+", help="training text files")
    p.add_argument("--heldout", type=Path, help="held-out text file (evaluation)")
    p.add_argument("--task", choices=["arith"],
                   help="train on synthetic arithmetic instead of text (see training/tasks.py)")
    p.add_argument("--max-add-digits", type=int, default=4, help="--task: largest addend")
    p.add_argument("--max-mul-digits", type=int, default=0,
                   help="--task: largest multiplicand (× one digit); 0 = no multiplication")
    p.add_argument("--curriculum", action=argparse.BooleanOptionalAction, default=True,
                   help="--task: open digit counts gradually over the first half")
    p.add_argument("--capacities", default="",
                   help="--task: comma-separated capacities cycled step by step (elastic "
                        "training); default: --train-capacity every step")
    p.add_argument("--task-format", choices=["plain", "chat"], default="plain",
                   help="--task: 'plain' (4821+397=5218, the arith model) or 'chat' (one user "
                        "turn in the --init model's chat template, the bare answer as reply)")
    p.add_argument("--calib-problems", type=int, default=2000,
                   help="--task: held-out problems the routing thresholds are calibrated on")
    p.add_argument("--trainable-layers", default="",
                   help="--task: only these layers train ('odd', 'all', 'itt' = the ITT "
                        "layers, or e.g. 14,16); default every parameter")
    p.add_argument("--eval-problems", type=int, default=200,
                   help="--task: problems per setting in the periodic exact-match check")
    p.add_argument("--calib", type=Path, help="text for routing calibration (default: --heldout)")
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    p.add_argument("--work-dir", type=Path, help="checkpoints and tokenizer (default OUT.work)")
    p.add_argument("--tokenizer", type=Path, help="reuse this tokenizer.model")
    p.add_argument("--init", type=Path,
                   help="continue from this model directory (dense or ITT); its architecture "
                        "and tokenizer are used, and shape flags must agree with it")
    help_ = {"itt_layers": "'odd' (every other layer, as in the paper), 'even', 'all', 'none', "
                           "or e.g. '1,3,5'"}
    for name, default in ARCH_DEFAULTS.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=None,
                       help=f"{help_.get(name, '')} (default {default})".strip())
    p.add_argument("--ship-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(flag, type=type(f.default), default=f.default)
    a = p.parse_args(argv)
    a.arch_given = {k: getattr(a, k) for k in ARCH_DEFAULTS if getattr(a, k) is not None}
    for name, default in ARCH_DEFAULTS.items():
        if getattr(a, name) is None:
            setattr(a, name, default)
    return a


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.task:
        return run_task(a)
    if not a.train or not a.heldout:
        print("itt-train: --train and --heldout are required (or --task)", file=sys.stderr)
        return 2
    loaded = None
    if a.init is not None:
        try:
            loaded = load_init(a)
        except ValueError as e:
            print(f"itt-train: error: {e}", file=sys.stderr)
            return 2
        init, tok = loaded.model, loaded.tokenizer
    else:
        init = None
    work = a.work_dir or a.out.with_name(a.out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    if init is not None:
        cfg, tok_file = init.cfg, a.init / "tokenizer.model"
    else:
        tok_file = a.tokenizer or work / "tokenizer.model"
        if not Path(tok_file).exists():
            print(f"training tokenizer ({a.vocab_size} pieces) …", file=sys.stderr)
            tok_file = train_tokenizer(a.train, a.vocab_size, work / "tokenizer")
        tok = Tokenizer(tok_file)
        cfg = model_config(a, tok)
    tc = TrainConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)})
    train_stream = torch.cat([encode_corpus(tok, f) for f in a.train])
    eval_stream = encode_corpus(tok, a.heldout)
    n_params = sum(p.numel() for p in ITTModel(cfg).parameters())
    print(f"{n_params / 1e6:.2f}M parameters; {train_stream.numel() / 1e6:.2f}M training "
          f"tokens; {tc.max_steps * tc.batch_size * tc.seq_len / 1e6:.2f}M tokens to see",
          file=sys.stderr)
    model = train(cfg, tc, tok, train_stream, eval_stream, work, log=log, init=init)

    def calibration_data() -> CalibrationData:
        calib_stream = encode_corpus(tok, a.calib) if a.calib else eval_stream
        return eval_windows(calib_stream, tc.seq_len, limit=256)[:, :-1], None

    def write(model: ITTModel, dtype: torch.dtype) -> Path:
        if init is not None:
            return write_checkpoint(model, a.out, dtype, a.init, loaded)
        return save_model(model, tok_file, a.out, dtype=dtype)

    return finish_run(
        model, model.finished, tc.stop_at, a.ship_dtype, calibration_data,
        {"train_config": dataclasses.asdict(tc), "parameters": n_params,
         "train_tokens_seen": tc.max_steps * tc.batch_size * tc.seq_len,
         "history": model.history, **({"init": str(a.init)} if a.init else {})},
        t_start, write, log)


if __name__ == "__main__":
    sys.exit(main())
