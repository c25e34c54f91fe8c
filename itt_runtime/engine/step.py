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

    @property
    def samples(self) -> bool:
        """Whether this step reaches the sequence's end, so its last logits pick a token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


def logit_positions(seq: Sequence, num_new_tokens: int, samples: bool) -> list[int]:
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


@dataclass
class RunnerOutput:
    """What the runner read back from the device for one plan, as host values."""
    routed_counts: dict[str, list[int]]      # seq_id -> tokens routed to each routed stream
    sampled: list[SampledToken]
    prompt_logprobs: list[tuple[Sequence, int, dict[int, float]]]   # (seq, position, entry)
    # seq_id -> (new tokens, routed streams) array, 1 where routed: multi-token rows only, and
    # only when prefix caching needs the stream lengths at block boundaries inside a chunk.
    routed_masks: dict[str, np.ndarray] = field(default_factory=dict)
