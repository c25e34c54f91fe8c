"""Self-speculative decoding: an ITT model drafts for itself at a low think budget and
verifies at the request's own budget (``--speculative-config '{"method": "itt_self"}'``).

One engine step of a verify row (the scheduler gave it ``1 + k`` tokens, ``num_draft`` = k):

1. **Draft** (``draft``): k decode steps of the row's next token and then of each drafted
   token, at the draft budget (its thresholds: at 0 every routed step is skipped, 8 of 20
   block applications per token on the default model). Each is an ordinary decode step of
   a *view* of the sequence (``dataclasses.replace``: its tokens plus the drafts so far, the
   draft thresholds) over the sequence's own KV streams, so it runs compiled or from a CUDA
   graph like any decode step. The draft attends to the target's K/V for the verified
   prefix and to its own base-stream K/V for the drafted positions, which it writes where
   the verify step writes next (decision (a) of the design: no second cache).
2. **Verify**: the row computes its next token and the k drafts in one multi-token step at
   the request's budget, routed exactly as decoding would route them (causal routing decides
   per token), and overwrites every K/V the draft wrote.
3. **Accept** (``ModelRunner._accept``; greedy rows: ``accepted_count``): the target's
   argmax at each position; the drafts are accepted up to the first that differs, and the
   target's token at that position follows.
   So the tokens are exactly those of non-speculative greedy decoding, and the K/V kept
   (the first accepted + 1 positions; routed streams keep the routed tokens among them) is
   what decoding would have written. Thinking depth and logprobs are the target's.

Sampled requests draft by sampling the draft's distribution and accept by the standard
rejection rule (``rejection_sample``), so their tokens are distributed exactly as the
target's own samples (not the same tokens as without speculation: the random numbers are
drawn differently). The scheduler's ``_draft_tokens`` says which requests speculate.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from itt_runtime.engine.sequence import Sequence
from itt_runtime.engine.step import ScheduledSeq
from itt_runtime.kv_cache.manager import SequenceKV
from itt_runtime.runner.forward import StepOutput
from itt_runtime.sampling import structured_output
from itt_runtime.sampling.sampler import Sampler


@dataclasses.dataclass
class Drafts:
    """What the draft phase produced for each verify row, by seq_id."""
    routed: dict[str, list[int]]         # routed tokens per routed stream (draft budget > 0)
    # Sampled rows: the draft's distribution q at each drafted position (V,), for acceptance.
    q: dict[str, list[torch.Tensor]]
    # Grammar rows: the token bitmask at each verified position (k + 1 of them; None after
    # the grammar completed within the drafts: nothing there is ever emitted).
    masks: dict[str, list[torch.Tensor | None]] = dataclasses.field(default_factory=dict)


# (rows as one-token decode rows, steps) -> each row's tokens, or None when it cannot run
# them (CompiledDecode.greedy_drafts where its variant is ready).
GreedyDrafts = Callable[[list[ScheduledSeq], int], "list[list[int]] | None"]


def draft(rows: list[ScheduledSeq], thresholds: list[float], budget: float,
          num_base_streams: int, run: Callable[[list[ScheduledSeq]], StepOutput],
          sampler: Sampler, greedy: GreedyDrafts | None = None) -> Drafts:
    """Fill ``draft_ids`` of every verify row with ``num_draft`` tokens: the draft's argmax
    for greedy rows, a sample of its distribution (the row's temperature, top-k, top-p,
    min-p; its own generator) for sampled ones. ``run``: the runner's decode-step function
    (compiled, graphed or eager). ``greedy``: a loop of greedy decode steps that runs all
    the drafts at once, used when every row is greedy, free of grammars, drafts as many
    tokens as the others and cannot route (the default draft budget, 0): the same tokens and
    K/V, without a trip through the runner and a read to the host per draft step."""
    routed = {s.seq.seq_id: [0] * (len(s.kv.lengths) - num_base_streams) for s in rows
              if s.kv is not None}
    if greedy is not None and all(t == math.inf for t in thresholds) \
            and all(s.seq.params.greedy and s.seq.params.grammar is None for s in rows) \
            and len({s.num_draft for s in rows}) == 1:
        views = [_view(s, 0, thresholds, budget, routed[s.seq.seq_id], num_base_streams)
                 for s in rows]
        drafted = greedy(views, rows[0].num_draft)
        if drafted is not None:
            for s, ids in zip(rows, drafted):
                s.draft_ids = ids
            return Drafts(routed, {})
    q: dict[str, list[torch.Tensor]] = {s.seq.seq_id: [] for s in rows
                                        if not s.seq.params.greedy}
    grammars = GrammarDrafts([s for s in rows if s.seq.params.grammar is not None])
    for s in rows:
        s.draft_ids = []
    for i in range(max(s.num_draft for s in rows)):
        active = [s for s in rows if s.num_draft > i]
        views = [_view(s, i, thresholds, budget, routed[s.seq.seq_id], num_base_streams)
                 for s in active]
        out = run(views)
        logits = out.logits.clone() if grammars.ids else out.logits
        grammars.mask(logits, active)
        tokens = logits.argmax(-1)
        sampled = [j for j, s in enumerate(active) if s.seq.seq_id in q]
        if sampled:
            seqs = [views[j].seq for j in sampled]
            probs = sampler.probabilities(logits[sampled], seqs)
            probs = probs / probs.sum(-1, keepdim=True)
            tokens[sampled] = sampler.race(probs, seqs)
            for j, row in zip(sampled, probs):
                q[active[j].seq.seq_id].append(row)
        # One read per draft step: the drafted tokens and the routed counts.
        host = torch.cat([tokens, out.routed_counts.flatten()]).tolist()
        counts = host[len(active):]
        width = len(counts) // len(active) if active else 0
        for j, s in enumerate(active):
            s.draft_ids.append(int(host[j]))
            row = routed[s.seq.seq_id]
            for k in range(width):
                row[k] += counts[j * width + k]
        grammars.advance(active)
    return Drafts(routed, q, grammars.finish(rows))


class GrammarDrafts:
    """Structured outputs while drafting: each grammar row's matcher follows its drafts (so
    every draft is a token the grammar allows there), the bitmask at each position is kept
    for the verify step (the target is masked exactly as decoding would mask it), and the
    matcher is rolled back at the end, so that only the tokens emitted advance it."""

    def __init__(self, rows: list[ScheduledSeq]) -> None:
        self.ids = {s.seq.seq_id for s in rows}
        self.masks: dict[str, list[torch.Tensor | None]] = {i: [] for i in self.ids}
        self.advanced: dict[str, int] = {i: 0 for i in self.ids}
        self.vocab_size = 0                 # the logits' width, from the first draft step
        for s in rows:
            grammar = s.seq.params.grammar
            if s.seq.grammar_matcher is None and grammar is not None:
                s.seq.grammar_matcher = grammar.matcher()

    def mask(self, logits: torch.Tensor, active: list[ScheduledSeq]) -> None:
        """Mask the draft logits of the active grammar rows (in place); keep their masks."""
        self.vocab_size = logits.shape[1]
        rows = [j for j, s in enumerate(active) if s.seq.seq_id in self.ids]
        live = [j for j in rows if not active[j].seq.grammar_matcher.is_terminated()]
        for j in rows:
            if j not in live:               # completed within the drafts: any token will do
                self.masks[active[j].seq.seq_id].append(None)
        if not live:
            return
        seqs = [active[j].seq for j in live]
        bitmask = structured_output.next_token_bitmasks(seqs, logits.shape[1])
        structured_output.apply_grammars(logits, seqs, live, bitmask)
        for seq, row in zip(seqs, bitmask):
            self.masks[seq.seq_id].append(row)

    def advance(self, active: list[ScheduledSeq]) -> None:
        for s in active:
            matcher = s.seq.grammar_matcher
            if s.seq.seq_id in self.ids and not matcher.is_terminated():
                assert matcher.accept_token(s.draft_ids[-1]), "a draft the grammar allows"
                self.advanced[s.seq.seq_id] += 1

    def finish(self, rows: list[ScheduledSeq]) -> dict[str, list[torch.Tensor | None]]:
        """The masks of every verified position (the last one's too), matchers rolled back."""
        for s in rows:
            if s.seq.seq_id not in self.ids:
                continue
            matcher = s.seq.grammar_matcher
            last = None
            if not matcher.is_terminated():
                last = structured_output.next_token_bitmasks([s.seq], self.vocab_size)[0]
            self.masks[s.seq.seq_id].append(last)
            if self.advanced[s.seq.seq_id]:
                matcher.rollback(self.advanced[s.seq.seq_id])
        return self.masks


def _view(s: ScheduledSeq, i: int, thresholds: list[float], budget: float,
          routed_so_far: list[int], num_base_streams: int) -> ScheduledSeq:
    """Draft step ``i`` of verify row ``s`` as a one-token decode row: the sequence with the
    drafts so far appended and the draft's thresholds, over its KV streams as they stand
    after those drafts (base streams hold every drafted position, routed streams the drafts
    routed there)."""
    seq = s.seq
    view = dataclasses.replace(
        seq, output_token_ids=seq.output_token_ids + s.draft_ids,
        num_computed_tokens=seq.num_computed_tokens + i, think_budget=budget,
        thresholds=thresholds, position_budgets=[], budget_changed=False)
    assert s.kv is not None
    lengths = [n + i for n in s.kv.lengths[:num_base_streams]] + [
        n + r for n, r in zip(s.kv.lengths[num_base_streams:], routed_so_far)]
    return ScheduledSeq(view, 1, SequenceKV(s.kv.block_tables, lengths), logit_positions=[0])


def rejection_sample(drafted: list[int], q: list[torch.Tensor], logits: torch.Tensor,
                     seq: Sequence, sampler: Sampler) -> list[int]:
    """The tokens a sampled verify row emits: drafted token i is accepted with probability
    min(1, p_i(d) / q_i(d)) (p: the target's distribution at that position, processed as the
    row samples); at the first rejection a token is drawn from the normalised residual
    max(0, p_i - q_i), and after k acceptances from p_k. The emitted tokens are distributed
    exactly as the target's own samples (the standard speculative sampling rule)."""
    k = len(drafted)
    p = sampler.probabilities(logits, [seq] * (k + 1))
    p = p / p.sum(-1, keepdim=True)                                    # (k + 1, V)
    d = torch.tensor(drafted, device=logits.device)
    at = torch.arange(k, device=logits.device)
    ratio = p[at, d] / torch.stack(q)[at, d]
    accept = (sampler.uniform(k, seq, logits.device) < ratio).tolist()
    m = accept.index(False) if False in accept else k
    if m < k:
        residual = (p[m] - q[m]).clamp(min=0)
        last = residual if residual.sum() > 0 else p[m]
    else:
        last = p[k]
    return drafted[:m] + [int(sampler.race(last[None], [seq])[0])]


def masked(logits: torch.Tensor, masks: list[torch.Tensor | None],
           seq: Sequence) -> torch.Tensor:
    """A verify row's logits (k + 1, V) with each position's grammar mask applied (a copy);
    positions after the grammar completed (no mask) are left as they are."""
    out = logits.clone()
    present = [(i, m) for i, m in enumerate(masks) if m is not None]
    rows = [i for i, _ in present]
    if present:
        bitmask = torch.stack([m for _, m in present])
        structured_output.apply_grammars(out, [seq] * len(rows), rows, bitmask)
    return out


def accepted_count(drafted: list[int], target: list[int]) -> int:
    """Drafts accepted: the length of the longest prefix of ``drafted`` that the target's
    tokens at the positions before them (``target[i]`` follows position i) agree with."""
    m = 0
    while m < len(drafted) and drafted[m] == target[m]:
        m += 1
    return m
