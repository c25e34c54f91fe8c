"""Training loop: AdamW, warmup + cosine, clipping, bf16 autocast, eval, checkpoint + resume."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from itt_runtime.config import ModelConfig
from itt_runtime.model.itt import ITTModel, TopKRouting
from itt_runtime.tokenizers.tokenizer import Tokenizer
from itt_runtime.training.data import eval_windows


@dataclass
class Schedule:
    """What every training run schedules, text (``TrainConfig``) or task
    (``task_trainer.TaskTrainConfig``): steps, the learning-rate schedule (``lr_at``),
    regularisation, evaluation and checkpoint cadence, and when to stop early."""
    max_steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200
    checkpoint_every: int = 200
    seed: int = 0
    stop_at: int = 0          # > 0: save state and stop at this step (resume later)
    max_wall_s: float = 0.0   # > 0: stop (and ship what there is) after this long


@dataclass
class TrainConfig(Schedule):
    seq_len: int = 256
    eval_batches: int = 8
    bf16: bool = False
    compile: bool = False
    # Upcycled models (``itt-train --init``, training/upcycle.py): for the first
    # router_warmup_steps steps only φ and the routers learn, and those two always learn at
    # lr × itt_lr_mult. See ``optimizer_for``.
    router_warmup_steps: int = 0
    itt_lr_mult: float = 1.0


def batches(stream: torch.Tensor, seq_len: int, batch_size: int, gen: torch.Generator):
    n = stream.numel() - seq_len - 1
    while True:
        starts = torch.randint(0, n, (batch_size,), generator=gen)
        chunk = torch.stack([stream[s: s + seq_len + 1] for s in starts.tolist()]).long()
        yield chunk[:, :-1], chunk[:, 1:]


def lr_at(step: int, tc: Schedule) -> float:
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * cosine)


def init_weights(model: ITTModel) -> None:
    for name, p in model.named_parameters():
        if name.endswith("phi") or "norm" in name:
            continue                                   # ones
        if name.endswith("bias"):
            torch.nn.init.zeros_(p)
        elif "routers" in name:
            torch.nn.init.normal_(p, std=0.02)
        else:
            std = 0.02
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                std = 0.02 / math.sqrt(2 * model.cfg.n_layers)   # GPT-2 residual scaling
            torch.nn.init.normal_(p, std=std)


@torch.no_grad()
def evaluate(model: ITTModel, windows: torch.Tensor, batch_size: int, routing=None,
             bf16: bool = False) -> float:
    """Mean next-token loss over ``windows`` (N, T+1)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i: i + batch_size]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(chunk[:, :-1], routing=routing(len(chunk)) if routing else None)
        loss = F.cross_entropy(out.logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += chunk[:, 1:].numel()
    model.train()
    return total / count


def is_itt_param(name: str) -> bool:
    """φ and the routers: the parameters an ITT layer adds to a dense layer."""
    return name.endswith(".phi") or ".routers." in name


def optimizer_for(model: ITTModel, tc) -> torch.optim.AdamW:
    """AdamW with weight decay on the backbone's matrices only (not the routers, not φ, not
    norms). φ and the routers form their own group, whose ``lr_mult`` (``tc.itt_lr_mult``)
    scales the schedule: an upcycled model starts them at φ_t = 0, and Adam moves a
    parameter by about lr per step, so at the backbone's continued-training lr φ_t would
    stay a small fraction of φ_0 = 1 for the whole of a short run."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    itt: list[torch.nn.Parameter] = []
    for n, p in model.named_parameters():
        (itt if is_itt_param(n) else decay if p.dim() >= 2 else no_decay).append(p)
    mult = getattr(tc, "itt_lr_mult", 1.0)
    groups = [{"params": decay, "weight_decay": tc.weight_decay, "lr_mult": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
              {"params": itt, "weight_decay": 0.0, "lr_mult": mult}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr, betas=(0.9, 0.95),
                             eps=1e-8)


def new_model(cfg: ModelConfig, tc) -> tuple[ITTModel, torch.optim.AdamW]:
    """A freshly initialised model (seeded by ``tc.seed``) and its AdamW (``optimizer_for``).
    ``tc``: a TrainConfig or anything with seed, lr and weight_decay."""
    torch.manual_seed(tc.seed)
    model = ITTModel(cfg)
    init_weights(model)
    return model, optimizer_for(model, tc)


def train(cfg: ModelConfig, tc: TrainConfig, tok: Tokenizer, train_stream: torch.Tensor,
          eval_stream: torch.Tensor, work_dir: Path, log=print,
          init: ITTModel | None = None) -> ITTModel:
    """Train (resuming from ``work_dir/state.pt`` if present) and return the model.
    ``init``: continue from this model's weights (``itt-train --init``) with a fresh
    optimizer, instead of a random initialisation."""
    if init is None:
        model, opt = new_model(cfg, tc)
    else:
        torch.manual_seed(tc.seed)
        model = init.float().train()
        opt = optimizer_for(model, tc)
    # Router warm-up freezes the backbone; a dense model has nothing else, so it has none.
    backbone = [p for n, p in model.named_parameters() if not is_itt_param(n)]
    router_warmup = tc.router_warmup_steps if cfg.is_itt else 0
    gen = torch.Generator().manual_seed(tc.seed)
    step, history = 0, []
    state_file = work_dir / "state.pt"
    if state_file.exists():
        state = torch.load(state_file, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, history = state["step"], state["history"]
        log(f"resumed from {state_file} at step {step}")
    routing = TopKRouting(cfg.train_capacity) if cfg.is_itt else None
    forward = torch.compile(model) if tc.compile else model
    windows = eval_windows(eval_stream, tc.seq_len, limit=tc.eval_batches * tc.batch_size)
    data = batches(train_stream, tc.seq_len, tc.batch_size, gen)
    tokens_per_step = tc.seq_len * tc.batch_size
    model.train()
    bar = tqdm(total=tc.max_steps, initial=step, unit="step", dynamic_ncols=True)
    t0, tokens_since = time.perf_counter(), 0
    out_of_time = False
    while step < tc.max_steps and not (tc.stop_at and step >= tc.stop_at):
        x, y = next(data)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc) * g.get("lr_mult", 1.0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tc.bf16):
            out = forward(x, routing=routing)
        loss = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step < router_warmup:
            # Router warm-up: AdamW skips parameters without a gradient (no update, no
            # weight decay, no moment change), so the backbone stays exactly as loaded.
            for p in backbone:
                p.grad = None
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        step += 1
        tokens_since += tokens_per_step
        elapsed = time.perf_counter() - t0
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_since / elapsed:.0f}")
        bar.update(1)
        if step % tc.eval_every == 0 or step == tc.max_steps:
            ev = evaluate(model, windows, tc.batch_size, bf16=tc.bf16,
                          routing=(lambda n: TopKRouting(cfg.train_capacity)) if routing else None)
            history.append({"step": step, "train_loss": loss.item(), "eval_loss": ev,
                            "eval_ppl": math.exp(ev), "elapsed_s": elapsed})
            bar.write(f"step {step}: train loss {loss.item():.3f}  held-out loss {ev:.3f} "
                      f"(ppl {math.exp(ev):.2f})")
        out_of_time = bool(tc.max_wall_s) and elapsed > tc.max_wall_s
        if out_of_time:
            log(f"wall-time limit {tc.max_wall_s:.0f}s reached at step {step}; shipping")
        if (step % tc.checkpoint_every == 0 or step in (tc.max_steps, tc.stop_at)
                or out_of_time):
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "generator": gen.get_state(), "step": step, "history": history,
                        "train_config": asdict(tc)}, state_file)
        if out_of_time:
            break
    bar.close()
    model.history = history
    model.finished = step >= tc.max_steps or out_of_time
    return model.eval()
