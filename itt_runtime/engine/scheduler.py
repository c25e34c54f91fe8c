"""Token-budget scheduler (vLLM v1 style): no prefill or decode phase, only tokens to compute.

Every step each request asks to compute ``num_tokens - num_computed_tokens`` tokens (a whole
or chunked prompt, or the one new token). Running requests are served first, in order, then
waiting ones (FCFS) while the step's token budget, ``max_num_seqs`` and free KV blocks allow.
When blocks run out, the most recently admitted running request is preempted: its blocks are
freed and it goes back to the front of the queue to be recomputed later (same output, since
causal routing and seeded sampling do not depend on batching).

A step is ``schedule()`` → the runner's ``execute_model(plan)`` → ``update_from_output(plan,
output)``: the plan carries everything the runner needs (KV streams, logit positions), and
the update commits the KV, appends the sampled tokens and finishes sequences.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from itt_runtime.engine.config import SpeculativeConfig
from itt_runtime.engine.sequence import Sequence, Status
from itt_runtime.engine.step import (
    RunnerOutput,
    ScheduledSeq,
    SchedulerOutput,
    SpecResult,
    logit_positions,
)
from itt_runtime.engine.stopping import append_token
from itt_runtime.kv_cache.manager import KVCacheManager
from itt_runtime.kv_cache.prefix_cache import CacheNode, chain_hash, root_hash

# SpeculativeConfig.min_acceptance ("auto"): judged once this many tokens were drafted, over
# about the last ACCEPTANCE_WINDOW drafted tokens; while it fails, one decode row in every
# PROBE_EVERY drafts anyway.
ACCEPTANCE_SAMPLE = 32
ACCEPTANCE_WINDOW = 256
PROBE_EVERY = 64


@dataclass
class StepBudget:
    """What is left of one step: tokens, and tokens for rows that compute more than one
    (prompt chunks, capped by ``--max-batch-prefill-tokens`` and elastic thinking)."""
    tokens: int
    prompt_tokens: int

    def tokens_for(self, remaining: int) -> int:
        """How many of a row's ``remaining`` tokens fit (0: none this step)."""
        n = min(remaining, self.tokens)
        return min(n, self.prompt_tokens) if remaining > 1 else n

    def take(self, n: int, prompt: bool) -> None:
        self.tokens -= n
        if prompt:
            self.prompt_tokens -= n


@dataclass(frozen=True)
class InFlight:
    """A block a step completes for the first time, as a waiting request sees it: the top-k
    of the prompt logprobs its node will carry (None: none), and the prompt token right after
    it in the request that computes it, whose entry the node will hold (None: not a prompt
    token)."""
    prompt_logprobs_k: int | None
    next_token: int | None


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: frozenset[int] = frozenset(),
                 enable_chunked_prefill: bool = True,
                 max_batch_prefill_tokens: int | None = None,
                 speculative: SpeculativeConfig | None = None) -> None:
        self.kv = kv
        self.speculative = speculative
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids          # every id that ends generation
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        # At most this many tokens per step for rows computing more than one token (prompt
        # chunks); None: only the token budget limits them. Both need chunked prefill. The
        # operator's fixed cap (--max-batch-prefill-tokens) bounds how long a prompt stalls
        # the decoding requests; elastic thinking sets the second one, step by step, to hold
        # an ITL target (elastic.py). The smaller of the two applies.
        self.max_batch_prefill_tokens = max_batch_prefill_tokens
        self.prefill_token_cap: int | None = None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.tokens_computed = 0                    # every token the model ran
        self.routed_tokens = [0] * kv.num_routed_streams    # per routed stream
        # Self-speculative decoding counters (EngineStats.spec_*).
        self.spec_num_drafts = 0
        self.spec_num_draft_tokens = 0
        self.spec_num_accepted_tokens = 0
        self.spec_accepted_per_position = [0] * (speculative.num_speculative_tokens
                                                 if speculative else 0)
        # ``min_acceptance``'s view: drafted and accepted tokens of the recent rounds (both
        # halved whenever the drafted pass ACCEPTANCE_WINDOW), and the decode rows that did
        # not draft for want of acceptance since the last round.
        self.recent_drafted = 0.0
        self.recent_accepted = 0.0
        self.rows_without_drafts = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        caps = [c for c in (self.max_batch_prefill_tokens, self.prefill_token_cap)
                if c is not None and self.enable_chunked_prefill]
        budget = StepBudget(self.max_num_batched_tokens,
                            min(caps, default=self.max_num_batched_tokens))
        scheduled: list[ScheduledSeq] = []
        if not self._schedule_running(budget, scheduled):    # nothing new if it preempted
            self._schedule_waiting(budget, scheduled)
        for s in scheduled:
            s.logit_positions = logit_positions(s.seq, s.num_new_tokens, s.samples,
                                                s.num_draft)
        return SchedulerOutput(scheduled)

    def _schedule_running(self, budget: StepBudget, scheduled: list[ScheduledSeq]) -> bool:
        """Running requests, oldest first; when blocks run out, the most recently admitted
        is preempted. Returns whether any was."""
        preempted = False
        i = 0
        while i < len(self.running) and budget.tokens > 0:
            seq = self.running[i]
            remaining = seq.num_tokens - seq.num_computed_tokens
            n = budget.tokens_for(remaining)
            if n == 0:                              # no prompt tokens left this step
                i += 1
                continue
            while not self.kv.can_allocate(seq.seq_id, n, may_route=seq.may_route):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    return True
            draft = self._draft_tokens(seq, budget) if remaining == 1 else 0
            if draft and not self.kv.can_allocate(seq.seq_id, 1 + draft,
                                                  may_route=seq.may_route):
                draft = 0                           # no room to speculate: decode as usual
            kv = self.kv.allocate(seq.seq_id, n + draft, may_route=seq.may_route)
            scheduled.append(ScheduledSeq(seq, n + draft, kv, num_draft=draft))
            budget.take(n + draft, remaining > 1)
            i += 1
        return preempted

    def _draft_tokens(self, seq: Sequence, budget: StepBudget) -> int:
        """How many tokens a decoding ``seq`` drafts this step (self-speculative decoding;
        0: it decodes one token as usual). Speculation serves requests computed above the
        draft budget whose next tokens depend on nothing but the logits and their grammar
        (no penalties, or min_tokens still holding back EOS), within their max_tokens, the
        context and the step's token budget, while the batch is below
        ``disable_by_batch_size`` (and, for "auto", not seeded sampling)."""
        spec = self.speculative
        p = seq.params
        if spec is None or seq.think_budget <= spec.draft_think_budget \
                or spec.disable_by_batch_size is not None \
                and len(self.running) >= spec.disable_by_batch_size \
                or not spec.seeded and p.seed is not None and not p.greedy \
                or len(seq.output_token_ids) < p.min_tokens \
                or p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 \
                or p.frequency_penalty != 0.0:
            return 0
        left = min(p.max_tokens - len(seq.output_token_ids),
                   self.max_model_len - seq.num_tokens)
        # Drafts beyond the tokens still wanted would be thrown away; one left: no gain.
        k = max(0, min(spec.num_speculative_tokens, left - 1, budget.tokens - 1))
        return k if k and self.drafts_pay() else 0

    def drafts_pay(self) -> bool:
        """``min_acceptance``: whether a decode row may draft, judged by the recent rounds'
        acceptance (yes until ACCEPTANCE_SAMPLE drafted tokens were seen). While it is too
        low, one row in every PROBE_EVERY still drafts, so a change of workload is seen."""
        spec = self.speculative
        if spec is None or spec.min_acceptance is None \
                or self.recent_drafted < ACCEPTANCE_SAMPLE \
                or self.recent_accepted >= spec.min_acceptance * self.recent_drafted:
            return True
        self.rows_without_drafts += 1
        if self.rows_without_drafts < PROBE_EVERY:
            return False
        self.rows_without_drafts = 0
        return True

    def _schedule_waiting(self, budget: StepBudget, scheduled: list[ScheduledSeq]) -> None:
        """Waiting requests, first come first served, while the budget, ``max_num_seqs`` and
        the KV blocks allow; each starts from its longest cached prefix, or waits a step
        for one being computed (``_waits_for_in_flight``)."""
        in_flight = self._blocks_in_flight(scheduled)
        deferred: list[Sequence] = []
        while self.waiting and budget.tokens > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            queried = self._may_use_cache(seq)
            node = self._cached_prefix(seq) if queried else None
            if queried and self._waits_for_in_flight(seq, node, in_flight, len(deferred)):
                deferred.append(self.waiting.popleft())
                continue
            computed = node.num_tokens if node else seq.num_computed_tokens
            remaining = seq.num_tokens - computed
            n = budget.tokens_for(remaining)
            if n == 0 or (n < remaining and not self.enable_chunked_prefill):
                break
            if not self.kv.can_allocate(seq.seq_id, n, adopting=node, may_route=seq.may_route):
                break
            self.waiting.popleft()
            if queried and self.kv.prefix_cache is not None:   # counted once admitted
                self.kv.prefix_cache.count(seq.num_tokens, node.num_tokens if node else 0)
            copies = self._adopt(seq, node) if node else []
            kv = self.kv.allocate(seq.seq_id, n, may_route=seq.may_route)
            seq.status = Status.RUNNING
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = time.time()
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n, kv, block_copies=copies))
            budget.take(n, remaining > 1)
            if queried:
                in_flight.update(self._blocks_in_flight(scheduled[-1:]))
        self.waiting.extendleft(reversed(deferred))             # at the front, in order

    def update_from_output(self, plan: SchedulerOutput,
                           output: RunnerOutput) -> dict[str, Exception]:
        """Commit the step's K/V, record prompt logprobs, append the sampled tokens and
        finish the sequences that are done. Returns the requests whose output processing
        raised (they are left for the engine to fail; nothing else is affected)."""
        for s in plan.scheduled:
            counts = output.routed_counts[s.seq.seq_id]
            kept = self._kept(s, output)
            self.kv.commit(s.seq.seq_id, kept, counts)
            self.tokens_computed += s.num_new_tokens
            spec = output.spec.get(s.seq.seq_id)
            if spec is not None:         # the compute counts its rejected and draft work too
                self._count_speculation(spec)
                counts = [a + b for a, b in zip(spec.verify_routed, spec.draft_routed)]
                self.tokens_computed += spec.drafted
            for k, count in enumerate(counts):
                self.routed_tokens[k] += count
            s.seq.num_computed_tokens += kept
            if s.seq.elastic:          # positions computed for the first time keep their budget
                seq = s.seq
                seq.position_budgets += [seq.think_budget] * (
                    seq.num_computed_tokens - len(seq.position_budgets))
        for seq, position, entry in output.prompt_logprobs:
            seq.prompt_logprobs[position] = entry
        if self.kv.prefix_cache is not None:
            for s in plan.scheduled:
                self._cache_blocks(s, output, self._kept(s, output))
        failed: dict[str, Exception] = {}
        for t in output.sampled:
            seq = t.seq
            if seq.request_id in failed or seq.finish_reason is not None:
                continue            # a verify row's tokens after the one that ended it
            try:
                append_token(seq, t.token, t.extra_steps, t.logprobs, self.max_model_len,
                             self.eos_token_ids)
                t.appended = True
            except Exception as error:           # noqa: BLE001 - fails this request only
                failed[seq.request_id] = error
                continue
            if seq.finish_reason is not None:
                self.stop(seq)
        return failed

    def _count_speculation(self, spec: SpecResult) -> None:
        self.spec_num_drafts += 1
        self.spec_num_draft_tokens += spec.drafted
        self.spec_num_accepted_tokens += spec.accepted
        self.recent_drafted += spec.drafted
        self.recent_accepted += spec.accepted
        if self.recent_drafted > ACCEPTANCE_WINDOW:
            self.recent_drafted /= 2
            self.recent_accepted /= 2
        for position in range(spec.accepted):
            self.spec_accepted_per_position[position] += 1

    # ---- prefix caching ---------------------------------------------------------------------
    def _block_hashes(self, seq: Sequence, num_blocks: int,
                      tokens: list[int] | None = None) -> list[bytes]:
        """The first ``num_blocks`` keys of ``seq``'s hash chain (kv_cache/prefix_cache.py),
        extended as its tokens grow. ``tokens``: its tokens, where they run ahead of
        ``all_token_ids`` (a verify row's accepted drafts, cached before they are appended)."""
        hashes, bs = seq.block_hashes, self.kv.block_size
        tokens = seq.all_token_ids if tokens is None else tokens
        while len(hashes) < num_blocks:
            k = len(hashes)
            parent = hashes[-1] if hashes else root_hash(seq.thresholds)
            hashes.append(chain_hash(parent, tokens[k * bs:(k + 1) * bs]))
        return hashes[:num_blocks]

    def _may_use_cache(self, seq: Sequence) -> bool:
        """A sequence with no KV yet, computed at its requested budget; one that wants prompt
        logprobs only on first admission (a recompute keeps the entries it has)."""
        return (self.kv.prefix_cache is not None and not seq.num_computed_tokens
                and not seq.budget_changed
                and not (seq.wants_prompt_logprobs and seq.output_token_ids))

    def _cached_prefix(self, seq: Sequence) -> CacheNode | None:
        """The longest cached prefix ``seq`` can start from. It always leaves the last token
        to compute (its logits pick the next one). A sequence that wants prompt logprobs uses
        nodes that give them for the same top-k, for its own tokens."""
        cache = self.kv.prefix_cache
        assert cache is not None
        wants_lp = seq.wants_prompt_logprobs
        limit = self._reusable_tokens(seq)
        hashes = self._block_hashes(seq, limit // self.kv.block_size)
        return cache.lookup(hashes, limit, seq.prompt_token_ids,
                            seq.params.prompt_logprobs if wants_lp else None)

    @staticmethod
    def _reusable_tokens(seq: Sequence) -> int:
        """The most tokens of ``seq`` a cached prefix may cover: all but the last (or, for
        prompt logprobs, all but the prompt's last)."""
        return (seq.num_prompt_tokens if seq.wants_prompt_logprobs else seq.num_tokens) - 1

    def _blocks_in_flight(self, scheduled: list[ScheduledSeq]) -> dict[bytes, InFlight]:
        """Keys of the full blocks that multi-token rows of ``scheduled`` complete this step
        and will cache, each with the prompt logprobs its node will give (``InFlight``).
        Decode rows (verify rows too) are left out: they rarely complete a block another
        request is waiting for, and this runs every step."""
        if self.kv.prefix_cache is None:
            return {}
        bs, out = self.kv.block_size, {}
        for s in scheduled:
            seq = s.seq
            if s.num_new_tokens < 2 or s.num_draft or seq.budget_changed:
                continue
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + s.num_new_tokens
            k = seq.params.prompt_logprobs if seq.wants_prompt_logprobs else None
            hashes = self._block_hashes(seq, end // bs)
            for j in range(start // bs, len(hashes)):
                after = (j + 1) * bs
                out[hashes[j]] = InFlight(k, seq.prompt_token_ids[after]
                                          if k is not None and after < seq.num_prompt_tokens
                                          else None)
        return out

    def _waits_for_in_flight(self, seq: Sequence, node: CacheNode | None,
                             in_flight: dict[bytes, InFlight], num_deferred: int) -> bool:
        """Whether ``seq`` skips this step to adopt, next step, the block another request
        computes now (``_next_block_in_flight``); at most ``max_num_seqs`` wait per step."""
        return num_deferred < self.max_num_seqs and self._next_block_in_flight(seq, node,
                                                                               in_flight)

    def _next_block_in_flight(self, seq: Sequence, node: CacheNode | None,
                              in_flight: dict[bytes, InFlight]) -> bool:
        """Whether the first block ``seq`` would compute is being computed this step by
        another request, in a form ``seq`` can adopt next step (same key, and the prompt
        logprobs it needs, the entry after the block included: the same next token).
        Requests that share a prompt and arrive together (lm-eval's continuations of one
        context, a burst behind one system prompt) then compute the shared part once instead
        of once each."""
        if not in_flight:
            return False
        bs = self.kv.block_size
        nxt = (node.num_tokens if node else 0) // bs
        hashes = self._block_hashes(seq, self._reusable_tokens(seq) // bs)
        if nxt >= len(hashes) or hashes[nxt] not in in_flight:
            return False
        if not seq.wants_prompt_logprobs:
            return True
        block = in_flight[hashes[nxt]]
        return (block.prompt_logprobs_k == seq.params.prompt_logprobs
                and block.next_token == seq.prompt_token_ids[(nxt + 1) * bs])

    def _adopt(self, seq: Sequence, node: CacheNode) -> list[tuple[int, int]]:
        copies = self.kv.adopt(seq.seq_id, node)
        seq.num_computed_tokens = node.num_tokens
        if not seq.output_token_ids:
            seq.num_cached_tokens = node.num_tokens
        if seq.wants_prompt_logprobs:          # lookup checked that the node gives them
            entries = node.adopt_logprobs(seq.prompt_token_ids, seq.params.prompt_logprobs or 0)
            seq.prompt_logprobs[1:node.num_tokens + 1] = entries[1:]
        return copies

    @staticmethod
    def _kept(s: ScheduledSeq, output: RunnerOutput) -> int:
        """Positions of the step whose K/V stay: all, except for a verify row, which drops
        those of its rejected drafts."""
        spec = output.spec.get(s.seq.seq_id)
        return s.num_new_tokens if spec is None else spec.accepted + 1

    def _cache_blocks(self, s: ScheduledSeq, output: RunnerOutput, kept: int) -> None:
        """Cache the state after every block boundary this step crossed for ``s.seq``
        (``kept``: the positions of the step that stay)."""
        seq, bs = s.seq, self.kv.block_size
        if seq.budget_changed:         # computed below its requested budget: not that key
            return
        end = seq.num_computed_tokens                      # after this step
        start = end - kept
        first, last = start // bs + 1, end // bs
        if first > last:
            return
        kv = self.kv.get(seq.seq_id)
        hashes = self._block_hashes(seq, last, seq.all_token_ids + s.draft_ids[:kept - 1]
                                    if s.num_draft else None)
        routed = output.routed_masks.get(seq.seq_id)       # per new token, per routed stream
        counts = output.routed_counts[seq.seq_id]          # routed this step, per stream
        nb = self.kv.num_base_streams
        lp_ok = seq.wants_prompt_logprobs
        # Routed tokens of this step up to and including each new token, per stream.
        cumulative = routed.cumsum(0) if routed is not None else None
        for k in range(first, last + 1):
            boundary = k * bs
            if boundary == end:
                lengths = list(kv.lengths)
            elif not self.kv.num_routed_streams:                  # a dense model
                lengths = [boundary] * nb
            else:                          # inside the chunk: count the routed tokens before
                assert cumulative is not None, "the runner returns routing for chunk rows"
                before = cumulative[boundary - start - 1]
                lengths = [boundary] * nb + [
                    kv.lengths[nb + j] - counts[j] + int(before[j])
                    for j in range(self.kv.num_routed_streams)]
            keep_lp = lp_ok and boundary <= seq.num_prompt_tokens - 1
            self.kv.cache_prefix(
                seq.seq_id, hashes[k - 1], hashes[k - 2] if k > 1 else None, boundary, lengths,
                seq.prompt_logprobs[:boundary + 1] if keep_lp else None,
                seq.params.prompt_logprobs if keep_lp else None)

    def _preempt(self, seq: Sequence) -> None:
        """Free everything and requeue at the front; it will recompute prompt + output."""
        self.kv.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        seq.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def stop(self, seq: Sequence) -> None:
        """Finish a sequence that reached its ``finish_reason``."""
        seq.metrics.finished_time = time.time()
        self.finish(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks at once."""
        self.kv.free(seq.seq_id)
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
