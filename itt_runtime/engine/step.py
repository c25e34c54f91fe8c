"""The data of one engine step, as it crosses from the scheduler to the runner and back
(vLLM v1's ``core/sched/output.py`` and ``outputs.py``): the plan (``SchedulerOutput`` of
``ScheduledSeq``) and what the runner read back (``RunnerOutput``). Plain dataclasses that
import neither side, so that the runner never imports the scheduler."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from itt_runtime.engine.sequence import Sequence
from itt_runtime.kv_cache.manager import SequenceKV


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int          # tokens computed this step, starting at seq.num_computed_tokens
    kv: SequenceKV | None = None                 # its KV streams, allocated for this step
    # K/V blocks to copy (source, destination) before the step: a cached prefix's partly
    # filled routed blocks, which this sequence appends into (prefix caching).
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # Indices within this step's new tokens whose logits are needed: the last one when the
    # step samples, and the prompt positions whose next-token logprobs were asked for.
    logit_positions: list[int] = field(default_factory=list)
    # Self-speculative decoding: this row verifies ``num_draft`` tokens drafted this step
    # (``draft_ids``, filled in by the runner's draft phase) after the sequence's last token,
    # so it computes 1 + num_draft tokens and needs the logits of all of them.
    num_draft: int = 0
    draft_ids: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """Whether this step reaches the sequence's end, so its last logits pick a token."""
        return self.num_draft > 0 or \
            self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens

    @property
    def input_ids(self) -> list[int]:
        """The tokens this row computes: the sequence's next ones, then any drafted ones."""
        c = self.seq.num_computed_tokens
        return self.seq.all_token_ids[c:c + self.num_new_tokens - self.num_draft] + \
            self.draft_ids


def logit_positions(seq: Sequence, num_new_tokens: int, samples: bool,
                    num_draft: int = 0) -> list[int]:
    if num_draft:                # a verify row: every position's target distribution
        return list(range(num_new_tokens))
    c, n = seq.num_computed_tokens, num_new_tokens
    wanted = []
    if seq.wants_prompt_logprobs:           # positions that predict the next prompt token
        wanted = [i for i in range(n) if c + i < seq.num_prompt_tokens - 1]
    if samples and (not wanted or wanted[-1] != n - 1):
        wanted.append(n - 1)
    return wanted


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def only(self, request_id: str) -> SchedulerOutput:
        """The part of this plan that belongs to one request."""
        return SchedulerOutput([s for s in self.scheduled if s.seq.request_id == request_id])

    @property
    def request_ids(self) -> list[str]:
        return list(dict.fromkeys(s.seq.request_id for s in self.scheduled))


@dataclass
class SampledToken:
    seq: Sequence
    token: int
    extra_steps: int                         # routed steps the position took (thinking depth)
    logprobs: dict[int, float]
    # Set by the scheduler once the token joined its sequence (a verify row's tokens after
    # one that ended the sequence do not).
    appended: bool = False


@dataclass
class SpecResult:
    """What one verify row of self-speculative decoding did: ``drafted`` tokens, of which the
    first ``accepted`` matched the target (so ``accepted + 1`` tokens were sampled and as
    many positions keep their K/V); the routed tokens of every stream over all verified
    positions and over the draft steps (compute accounting: rejected work was done too)."""
    drafted: int
    accepted: int
    verify_routed: list[int]
    draft_routed: list[int]


@dataclass
class RunnerOutput:
    """What the runner read back from the device for one plan, as host values."""
    routed_counts: dict[str, list[int]]      # seq_id -> tokens routed to each routed stream
    sampled: list[SampledToken]
    prompt_logprobs: list[tuple[Sequence, int, dict[int, float]]]   # (seq, position, entry)
    # seq_id -> (new tokens, routed streams) array, 1 where routed: multi-token rows only, and
    # only when prefix caching needs the stream lengths at block boundaries inside a chunk.
    routed_masks: dict[str, np.ndarray] = field(default_factory=dict)
    # seq_id -> the verify row's result (self-speculative decoding); routed_counts and
    # routed_masks of such a row cover only the positions it keeps (accepted + 1).
    spec: dict[str, SpecResult] = field(default_factory=dict)
