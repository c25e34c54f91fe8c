"""The token-budget scheduler on a real KV manager and block pool (pure Python, no model):
the exact batches it schedules, the exact blocks it hands out, and what it preempts.

Tested through ``add``, ``schedule``, ``finish`` and ``has_work`` and the ``scheduled`` list of
``ScheduledSeq(seq, num_new_tokens)``; ``run`` below stands in for the runner and hands the
scheduler one token for every sequence whose step reaches its end (``update_from_output``), so
that several steps can be followed exactly. Block size 4 and one stream throughout, so a
sequence of T computed tokens holds ceil(T / 4) blocks; the pool hands out its free blocks in
FIFO order, which makes every block id below predictable by hand."""

from __future__ import annotations

import pytest

from itt_runtime.engine.scheduler import Scheduler
from itt_runtime.engine.sequence import Sequence, Status
from itt_runtime.engine.step import RunnerOutput, SampledToken
from itt_runtime.kv_cache.block_pool import BlockPool
from itt_runtime.kv_cache.manager import KVCacheManager
from itt_runtime.sampling_params import SamplingParams

BLOCK = 4
TOKEN = 7                                # what the stand-in runner "samples" every time


@pytest.fixture
def make():
    def make(num_blocks: int, max_num_batched_tokens: int = 64, max_num_seqs: int = 8,
             chunked: bool = True) -> tuple[Scheduler, KVCacheManager]:
        kv = KVCacheManager(BlockPool(num_blocks), BLOCK, num_streams=1, num_base_streams=1)
        return Scheduler(kv, max_num_seqs, max_num_batched_tokens, max_model_len=1000,
                         enable_chunked_prefill=chunked), kv
    return make


def seq(name: str, prompt_len: int, max_tokens: int = 100) -> Sequence:
    return Sequence(name, name, 0, list(range(10, 10 + prompt_len)),
                    SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                    0.0, [])


def run(sched: Scheduler, kv: KVCacheManager) -> list[tuple[str, int]]:
    """One step: schedule, then report TOKEN for each sequence that reached its end (one
    stream, so no routed counts). Returns [(seq_id, num_new_tokens)]."""
    plan = sched.schedule()
    sampled = [SampledToken(s.seq, TOKEN, 0, {}) for s in plan.scheduled if s.samples]
    failed = sched.update_from_output(plan, RunnerOutput(
        routed_counts={s.seq.seq_id: [] for s in plan.scheduled}, sampled=sampled,
        prompt_logprobs=[]))
    assert not failed
    return [(s.seq.seq_id, s.num_new_tokens) for s in plan.scheduled]


def blocks(kv: KVCacheManager, s: Sequence) -> list[int]:
    (table,) = kv.get(s.seq_id).block_tables
    return table


def test_token_budget_chunks_a_long_prompt_and_admits_the_next_one_later(make):
    sched, kv = make(num_blocks=16, max_num_batched_tokens=8)
    a, b = seq("a", 10), seq("b", 3)
    sched.add(a)
    sched.add(b)
    assert run(sched, kv) == [("a", 8)]                  # the budget ends inside a's prompt
    assert a.num_computed_tokens == 8 and a.output_token_ids == []    # a chunk never samples
    assert blocks(kv, a) == [0, 1] and b.status is Status.WAITING
    assert run(sched, kv) == [("a", 2), ("b", 3)]        # a's rest first, then b
    assert blocks(kv, a) == [0, 1, 2] and blocks(kv, b) == [3]
    assert len(a.output_token_ids) == len(b.output_token_ids) == 1
    assert run(sched, kv) == [("a", 1), ("b", 1)]        # decode: one token each
    assert run(sched, kv) == [("a", 1), ("b", 1)]
    assert blocks(kv, a) == [0, 1, 2] and blocks(kv, b) == [3, 4]   # b's 5th token: new block


def test_prefill_cap_bounds_the_prompt_tokens_of_a_step_not_its_decode_rows(make):
    """--max-batch-prefill-tokens: prompts share at most that many tokens per step (the rest
    is chunked over later steps) while every decoding row still gets its token; an elastic
    cap below it wins."""
    sched, kv = make(num_blocks=32, max_num_batched_tokens=64)
    sched.max_batch_prefill_tokens = 6
    a, b, c = seq("a", 2), seq("b", 9), seq("c", 4)
    sched.add(a)
    assert run(sched, kv) == [("a", 2)]
    sched.add(b)
    sched.add(c)
    assert run(sched, kv) == [("a", 1), ("b", 6)]        # b's first chunk uses the cap
    assert run(sched, kv) == [("a", 1), ("b", 3), ("c", 3)]   # b's rest, c's first 3
    d = seq("d", 20)
    sched.add(d)
    sched.prefill_token_cap = 2                           # the smaller cap applies
    assert run(sched, kv) == [("a", 1), ("b", 1), ("c", 1), ("d", 2)]  # c: its last one
    assert run(sched, kv) == [("a", 1), ("b", 1), ("c", 1), ("d", 2)]
    sched.prefill_token_cap = 50                          # a larger one does not lift it
    assert run(sched, kv) == [("a", 1), ("b", 1), ("c", 1), ("d", 6)]


def test_running_requests_take_the_budget_before_waiting_ones(make):
    sched, kv = make(num_blocks=16, max_num_batched_tokens=4)
    a, b, c = seq("a", 2), seq("b", 1), seq("c", 10)
    for s in (a, b):
        sched.add(s)
    assert run(sched, kv) == [("a", 2), ("b", 1)]
    sched.add(c)
    assert run(sched, kv) == [("a", 1), ("b", 1), ("c", 2)]   # c gets what is left: 4 - 2
    assert run(sched, kv) == [("a", 1), ("b", 1), ("c", 2)]
    assert c.num_computed_tokens == 4


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget_in_fcfs_order(make):
    sched, kv = make(num_blocks=16, max_num_batched_tokens=8, chunked=False)
    a, b, c = seq("a", 6), seq("b", 3), seq("c", 1)
    for s in (a, b, c):
        sched.add(s)
    # b does not fit in the 2 tokens left, and c, which would, may not overtake it.
    assert run(sched, kv) == [("a", 6)]
    assert run(sched, kv) == [("a", 1), ("b", 3), ("c", 1)]


def test_max_num_seqs_caps_the_batch_and_finish_makes_room(make):
    sched, kv = make(num_blocks=8, max_num_seqs=2)
    a, b, c = seq("a", 2), seq("b", 2), seq("c", 2)
    for s in (a, b, c):
        sched.add(s)
    assert run(sched, kv) == [("a", 2), ("b", 2)]
    assert run(sched, kv) == [("a", 1), ("b", 1)]
    assert c.status is Status.WAITING and kv.pool.num_free == 6
    sched.finish(a)
    assert a.status is Status.FINISHED and kv.pool.num_free == 7
    assert run(sched, kv) == [("b", 1), ("c", 2)]
    assert blocks(kv, c) == [2]                            # a's block 0 went to the back


def test_preemption_takes_the_newest_request_and_requeues_it_in_front(make):
    sched, kv = make(num_blocks=4)
    a, b = seq("a", 7), seq("b", 7)
    sched.add(a)
    sched.add(b)
    assert run(sched, kv) == [("a", 7), ("b", 7)]
    assert blocks(kv, a) == [0, 1] and blocks(kv, b) == [2, 3]
    assert run(sched, kv) == [("a", 1), ("b", 1)]        # token 8 still fits in 2 blocks
    # Token 9 needs a third block each and none is free: b goes, and a gets b's first block.
    assert run(sched, kv) == [("a", 1)]
    assert blocks(kv, a) == [0, 1, 2]
    assert b.status is Status.WAITING and b.num_computed_tokens == 0
    assert b.metrics.num_preemptions == 1 and sched.num_preemptions == 1
    # b must recompute 7 prompt + 2 output tokens (3 blocks); only block 3 is free.
    assert run(sched, kv) == [("a", 1)]
    sched.finish(a)
    assert kv.pool.num_free == 4
    assert run(sched, kv) == [("b", 9)]                  # prompt and outputs in one go
    assert blocks(kv, b) == [3, 0, 1]
    assert b.output_token_ids == [TOKEN] * 3


def test_preemption_goes_back_to_front_until_the_oldest_fits(make):
    sched, kv = make(num_blocks=3)
    a, b, c = seq("a", 4), seq("b", 4), seq("c", 4)
    for s in (a, b, c):
        sched.add(s)
    assert run(sched, kv) == [("a", 4), ("b", 4), ("c", 4)]
    assert [blocks(kv, s) for s in (a, b, c)] == [[0], [1], [2]]
    # Each needs a second block. c is preempted for a; then b, needing one too, is the last
    # running request and preempts itself. Nothing waiting is admitted in a preempting step.
    assert run(sched, kv) == [("a", 1)]
    assert blocks(kv, a) == [0, 2]
    assert b.status is c.status is Status.WAITING
    sched.finish(a)                                        # frees 0, 2 behind b's 1
    assert run(sched, kv) == [("b", 5)]                  # b before c: FCFS order kept
    assert blocks(kv, b) == [1, 0]
    assert c.status is Status.WAITING                      # 5 tokens need 2 blocks; 1 free


def test_a_request_alone_that_runs_out_of_blocks_preempts_itself(make):
    sched, kv = make(num_blocks=2)
    a = seq("a", 8)
    sched.add(a)
    assert run(sched, kv) == [("a", 8)]
    assert run(sched, kv) == []
    assert a.status is Status.WAITING and a.num_computed_tokens == 0
    assert kv.pool.num_free == 2 and sched.has_work()


def test_finish_frees_blocks_of_running_and_waiting_requests(make):
    sched, kv = make(num_blocks=8, max_num_batched_tokens=6)
    a, b, c = seq("a", 5), seq("b", 5), seq("c", 2)
    for s in (a, b, c):
        sched.add(s)
    assert run(sched, kv) == [("a", 5), ("b", 1)]        # b's first chunk: 1 token
    assert kv.pool.num_free == 8 - 2 - 1
    sched.finish(b)                                        # running, mid-prompt
    sched.finish(c)                                        # never scheduled
    assert kv.pool.num_free == 8 - 2
    assert b.status is c.status is Status.FINISHED
    assert run(sched, kv) == [("a", 1)]
    sched.finish(a)
    assert kv.pool.num_free == 8 and kv.num_sequences == 0
    assert not sched.has_work() and run(sched, kv) == []


@pytest.mark.parametrize("budget", [1, 3, 8])
def test_any_budget_computes_each_prompt_once_in_order(make, budget):
    sched, kv = make(num_blocks=64, max_num_batched_tokens=budget, max_num_seqs=2)
    seqs = [seq(f"s{i}", n, max_tokens=3) for i, n in enumerate((5, 1, 9, 4))]
    for s in seqs:
        sched.add(s)
    steps, first_token_order = 0, []
    while sched.has_work():                        # max_tokens finishes each one
        for _, n in run(sched, kv):
            assert n <= budget
        steps += 1
        for s in seqs:
            if s.output_token_ids and s.seq_id not in first_token_order:
                first_token_order.append(s.seq_id)
        assert steps < 200
    assert first_token_order[:2] == ["s0", "s1"]
    assert all(s.finished and s.output_token_ids == [TOKEN] * 3 for s in seqs)
    assert kv.pool.num_free == 64
