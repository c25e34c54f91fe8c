"""Token-budget scheduler (vLLM v1 style): no prefill or decode phase, only tokens to compute.

Every step each request asks to compute ``num_tokens - num_computed_tokens`` tokens (a whole
or chunked prompt, or the one new token). Running requests are served first, in order, then
waiting ones (FCFS) while the token budget, ``max_num_seqs`` and free KV blocks allow. When
blocks run out, the most recently admitted running request is preempted: its blocks are freed
and it goes back to the front of the queue to be recomputed later (same output, since causal
routing and seeded sampling do not depend on batching).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from itt_runtime.kv_cache.manager import KVCacheManager
from itt_runtime.request import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int          # tokens computed this step, starting at seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Whether this step reaches the sequence's end, so its last logits pick a token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []

        # 1. running requests, oldest first; preempt from the back when blocks run out
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.can_allocate(seq.seq_id, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.kv.allocate(seq.seq_id, n)
                scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1
                continue
            break                                   # seq itself was preempted

        # 2. waiting requests, first come first served; none if anything was preempted
        while self.waiting and budget > 0 and not preempted \
                and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            remaining = seq.num_tokens - seq.num_computed_tokens
            n = min(remaining, budget)
            if n < remaining and not self.enable_chunked_prefill:
                break
            if not self.kv.can_allocate(seq.seq_id, n):
                break
            self.waiting.popleft()
            self.kv.allocate(seq.seq_id, n)
            seq.status = Status.RUNNING
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = time.time()
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return SchedulerOutput(scheduled, preempted)

    def _preempt(self, seq: Sequence) -> None:
        """Free everything and requeue at the front; it will recompute prompt + output."""
        self.kv.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        seq.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks at once."""
        self.kv.free(seq.seq_id)
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
