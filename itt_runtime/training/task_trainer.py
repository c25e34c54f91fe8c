"""Training on a synthetic task stream (training/tasks.py) instead of a text corpus.

What differs from trainer.py, and why (the packed, every-token recipe scored 0-1%):
  * one problem per sequence, right-padded, never packed: a problem's answer only ever sees
    its own prompt;
  * the loss is on the answer digits and EOS only: the operands are random and unlearnable,
    and their loss would otherwise dominate the gradient;
  * a curriculum over digit counts (tasks.curriculum_mix);
  * top-k routing per problem over its real tokens only (padding is never routed and never
    takes a routed slot), optionally at a capacity that cycles through a list (elastic).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F

from itt_runtime.config import ModelConfig
from itt_runtime.model.itt import ITTModel, Routing
from itt_runtime.tokenizers.tokenizer import Tokenizer
from itt_runtime.training import tasks
from itt_runtime.training.trainer import Schedule, lr_at, new_model

IGNORE = -100


@dataclass
class TaskTrainConfig(Schedule):
    max_steps: int = 3000
    batch_size: int = 64             # problems per step
    lr: float = 3e-3
    eval_every: int = 250
    checkpoint_every: int = 250
    eval_problems: int = 200         # per (task, digits) setting, teacher-forced exact match
    max_add_digits: int = 4
    max_mul_digits: int = 0          # 0: no multiplication problems
    curriculum: bool = True
    # Elastic training: each step routes a capacity drawn from these (empty: the model's
    # train_capacity every step), so that every budget of the sweep is one the model knows.
    capacities: tuple[float, ...] = ()

    @property
    def max_digits(self) -> dict[str, int]:
        out = {"add": self.max_add_digits}
        if self.max_mul_digits:
            out["mul"] = self.max_mul_digits
        return out


def train_char_tokenizer(out_prefix: Path) -> Path:
    """A character-level sentencepiece model over tasks.CHARS (no byte fallback, no "▁")."""
    sample = out_prefix.with_suffix(".txt")
    sample.write_text("\n".join(tasks.CHARS * 20 for _ in range(50)) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(sample), model_prefix=str(out_prefix), model_type="char",
        vocab_size=len(tasks.CHARS) + 3, character_coverage=1.0, byte_fallback=False,
        add_dummy_prefix=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return out_prefix.with_suffix(".model")


def encode_problems(tok: Tokenizer, problems: list[tasks.Problem]):
    """-> input ids (B, T), targets (B, T) with IGNORE outside answer+EOS, lengths (B,).

    Sequence: BOS prompt answer EOS, right-padded with EOS. Position i predicts token i+1."""
    seqs, n_prompt = [], []
    for p in problems:
        prompt = tok.encode(p.prompt, add_bos=True)
        seqs.append(prompt + tok.encode(p.answer, add_bos=False, add_eos=True))
        n_prompt.append(len(prompt))
    T = max(map(len, seqs)) - 1
    ids = torch.full((len(seqs), T), tok.eos_token_id, dtype=torch.long)
    tgt = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    for i, (s, n) in enumerate(zip(seqs, n_prompt)):
        ids[i, : len(s) - 1] = torch.tensor(s[:-1])
        tgt[i, n - 1: len(s) - 1] = torch.tensor(s[n:])
    lengths = torch.tensor([len(s) - 1 for s in seqs])
    return ids, tgt, lengths


class PaddedTopKRouting(Routing):
    """Paper-mode top-k per sequence, over each sequence's first ``lengths[b]`` tokens only:
    ceil(capacity · length) of them are routed; padding never is."""

    def __init__(self, capacity: float, lengths: torch.Tensor, T: int) -> None:
        self.capacity = capacity
        self.valid = torch.arange(T)[None, :] < lengths[:, None]                   # (B, T)
        self.k = torch.ceil(capacity * lengths.float()).long().clamp(max=T)        # (B,)

    def select(self, stream: int, logits: torch.Tensor) -> torch.Tensor:
        if self.capacity >= 1.0:
            return self.valid.clone()
        masked = logits.float().masked_fill(~self.valid, -math.inf)
        order = masked.argsort(dim=1, descending=True)                           # (B, T)
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(order.shape[1]).expand_as(order))
        return (rank < self.k[:, None]) & self.valid


@torch.no_grad()
def exact_match(model: ITTModel, tok: Tokenizer, problems: list[tasks.Problem],
                routing_for=None, batch_size: int = 500) -> tuple[float, float, list[float]]:
    """Teacher-forced exact match (= greedy exact match: greedy reproduces the answer iff
    every answer token, EOS included, is the argmax given the correct prefix), the mean
    extra block applications per real token, and the routed fraction of real tokens at each
    routed stream (empty for a dense model). ``routing_for(lengths, T)`` -> Routing or None
    (None: causal thresholds at the model's default budget)."""
    model.eval()
    correct, count = 0, 0
    routed = torch.zeros(model.cfg.max_extra_steps)
    for i in range(0, len(problems), batch_size):
        ids, tgt, lengths = encode_problems(tok, problems[i: i + batch_size])
        routing = routing_for(lengths, ids.shape[1]) if routing_for else None
        out = model(ids, routing=routing)
        pred = out.logits.argmax(-1)
        ok = ((pred == tgt) | (tgt == IGNORE)).all(1)
        correct += int(ok.sum())
        valid = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
        if out.routed is not None:
            routed += out.routed[valid].float().sum(0)
        count += int(valid.sum())
    per_stream = (routed / max(1, count)).tolist()
    extra = float(routed.sum()) / max(1, count)
    return correct / max(1, len(problems)), extra, per_stream


@dataclass
class TaskTrainResult:
    model: ITTModel                  # in eval mode
    history: list[dict]
    steps_done: int
    finished: bool                   # False: stopped at --stop-at, resume to finish


def train_tasks(cfg: ModelConfig, tc: TaskTrainConfig, tok: Tokenizer, work_dir: Path,
                log=print) -> TaskTrainResult:
    """Train (resuming from ``work_dir/state.pt``) on the task stream."""
    model, opt = new_model(cfg, tc)
    step, history, elapsed0 = 0, [], 0.0
    elapsed = 0.0
    state_file = work_dir / "state.pt"
    if state_file.exists():
        state = torch.load(state_file, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, history, elapsed0 = state["step"], state["history"], state.get("elapsed_s", 0.0)
        log(f"resumed from {state_file} at step {step}")
    evalset = {(t, d): tasks.take("calib", tc.seed, t, d, tc.eval_problems)
               for t, top in tc.max_digits.items() for d in range(1, top + 1)}
    # Problem j of training is a pure function of (seed, step): resume replays nothing.
    t0 = time.perf_counter()
    model.train()
    stopped_early = False
    while step < tc.max_steps and not (tc.stop_at and step >= tc.stop_at):
        elapsed = elapsed0 + time.perf_counter() - t0
        if tc.max_wall_s and elapsed > tc.max_wall_s:
            log(f"wall-time limit {tc.max_wall_s:.0f}s reached at step {step}")
            stopped_early = True
            break
        progress = step / tc.max_steps if tc.curriculum else 1.0
        mix = tasks.curriculum_mix(progress, tc.max_digits)
        gen = tasks.stream("train", tc.seed * 1_000_003 + step, mix)
        problems = [next(gen) for _ in range(tc.batch_size)]
        ids, tgt, lengths = encode_problems(tok, problems)
        capacity = tc.capacities[step % len(tc.capacities)] if tc.capacities \
            else cfg.train_capacity
        routing = PaddedTopKRouting(capacity, lengths, ids.shape[1]) if cfg.is_itt else None
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        out = model(ids, routing=routing)
        loss = F.cross_entropy(out.logits.flatten(0, 1), tgt.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        step += 1
        if step % tc.eval_every == 0 or step == tc.max_steps:
            elapsed = elapsed0 + time.perf_counter() - t0
            route = (lambda n, T: PaddedTopKRouting(cfg.train_capacity, n, T)) \
                if cfg.is_itt else None
            acc = {f"{t}{d}": exact_match(model, tok, ps, route)[0]
                   for (t, d), ps in evalset.items()}
            model.train()
            history.append({"step": step, "train_loss": loss.item(), "elapsed_s": elapsed,
                            "exact_match": acc})
            log(f"step {step} ({elapsed:.0f}s): loss {loss.item():.3f}  "
                + " ".join(f"{k} {v:.2f}" for k, v in acc.items()))
        if step % tc.checkpoint_every == 0 or step in (tc.max_steps, tc.stop_at):
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "step": step, "history": history, "train_config": asdict(tc),
                        "elapsed_s": elapsed0 + time.perf_counter() - t0}, state_file)
    return TaskTrainResult(model.eval(), history, step, step >= tc.max_steps or stopped_early)
