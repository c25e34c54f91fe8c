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
from typing import Protocol

import sentencepiece as spm
import torch
import torch.nn.functional as F

from itt_runtime.config import ModelConfig
from itt_runtime.model.itt import ITTModel, Routing
from itt_runtime.tokenizers.tokenizer import Tokenizer
from itt_runtime.training import tasks
from itt_runtime.training.trainer import (
    Schedule,
    is_itt_param,
    lr_at,
    new_model,
    optimizer_for,
)

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
    # Fine-tuning a checkpoint (``--init``; issue 30's upcycled SmolLM2): only these layers
    # train (empty: every parameter), the ITT parameters (φ, routers) alone for the first
    # router_warmup_steps steps, at lr × itt_lr_mult (see trainer.optimizer_for).
    trainable_layers: tuple[int, ...] = ()
    router_warmup_steps: int = 0
    itt_lr_mult: float = 1.0

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


class ProblemFormat(Protocol):
    """How a problem becomes tokens: the prompt the model is given and the answer it must
    write (ending with the token that ends a reply). ``PlainFormat`` here; the chat format of
    an instruct model is ``chat_tasks.ChatFormat``."""
    name: str

    def prompt_ids(self, problem: tasks.Problem) -> list[int]: ...

    def answer_ids(self, problem: tasks.Problem) -> list[int]: ...


class PlainFormat:
    """BOS prompt answer EOS: the ``arith`` model's format ("4821+397=" → "5218")."""
    name = "plain"

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok

    def prompt_ids(self, problem: tasks.Problem) -> list[int]:
        return self.tok.encode(problem.prompt, add_bos=True)

    def answer_ids(self, problem: tasks.Problem) -> list[int]:
        return self.tok.encode(problem.answer, add_bos=False, add_eos=True)


def encode_problems(fmt: ProblemFormat, problems: list[tasks.Problem]):
    """-> input ids (B, T), targets (B, T) with IGNORE outside the answer (its final token
    included), lengths (B,). Sequence: prompt then answer, right-padded with the answer's
    final token. Position i predicts token i+1."""
    seqs, n_prompt = [], []
    for p in problems:
        prompt = fmt.prompt_ids(p)
        seqs.append(prompt + fmt.answer_ids(p))
        n_prompt.append(len(prompt))
    T = max(map(len, seqs)) - 1
    ids = torch.full((len(seqs), T), seqs[0][-1], dtype=torch.long)
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
def exact_match(model: ITTModel, fmt: ProblemFormat, problems: list[tasks.Problem],
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
        ids, tgt, lengths = encode_problems(fmt, problems[i: i + batch_size])
        routing = routing_for(lengths, ids.shape[1]) if routing_for else None
        answer = tgt != IGNORE
        out = model(ids, routing=routing, logits_at=answer)
        hit = torch.ones_like(answer)
        hit[answer] = out.logits.argmax(-1) == tgt[answer]
        ok = hit.all(1)
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


def freeze_except(model: ITTModel, layers: tuple[int, ...]) -> int:
    """Make only ``layers`` (their block, φ and routers) trainable; () keeps everything
    trainable. Returns the number of trainable parameters. Frozen layers below the first
    trainable one then build no autograd graph at all: their forward is inference."""
    if layers:
        for p in model.parameters():
            p.requires_grad_(False)
        for i in layers:
            for p in model.layers[i].parameters():
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_tasks(cfg: ModelConfig, tc: TaskTrainConfig, fmt: ProblemFormat, work_dir: Path,
                log=print, init: ITTModel | None = None) -> TaskTrainResult:
    """Train (resuming from ``work_dir/state.pt``) on the task stream, from a fresh model or
    from ``init`` (fine-tuning: ``tc.trainable_layers``, router warm-up, φ/router LR)."""
    if init is None:
        model, opt = new_model(cfg, tc)
    else:
        torch.manual_seed(tc.seed)
        model = init.float()
    freeze_except(model, tc.trainable_layers)
    if init is not None:
        opt = optimizer_for(model, tc)
    router_warmup = tc.router_warmup_steps if cfg.is_itt else 0
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
        ids, tgt, lengths = encode_problems(fmt, problems)
        capacity = tc.capacities[step % len(tc.capacities)] if tc.capacities \
            else cfg.train_capacity
        routing = PaddedTopKRouting(capacity, lengths, ids.shape[1]) if cfg.is_itt else None
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc) * g.get("lr_mult", 1.0)
        answer = tgt != IGNORE            # the LM head runs on the answer positions only
        out = model(ids, routing=routing, logits_at=answer)
        loss = F.cross_entropy(out.logits, tgt[answer])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step < router_warmup:          # the backbone keeps its weights (trainer.train)
            for n, p in model.named_parameters():
                if not is_itt_param(n):
                    p.grad = None
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        step += 1
        if step % tc.eval_every == 0 or step == tc.max_steps:
            elapsed = elapsed0 + time.perf_counter() - t0
            route = (lambda n, T: PaddedTopKRouting(cfg.train_capacity, n, T)) \
                if cfg.is_itt else None
            acc = {f"{t}{d}": exact_match(model, fmt, ps, route)[0]
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
