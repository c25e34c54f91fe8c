"""Block pool and KV manager: pure Python, exact block ids."""

import pytest

from itt_runtime.kv_cache.block_pool import BlockPool
from itt_runtime.kv_cache.manager import KVCacheManager


def make(num_blocks=32, block_size=4, streams=3, base=2):
    return KVCacheManager(BlockPool(num_blocks), block_size, streams, base)


def test_pool_fifo_ids():
    pool = BlockPool(5)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(1) == [2]
    pool.free([1, 0])
    assert pool.allocate(3) == [3, 4, 1]
    assert pool.num_free == 1 and pool.usage == pytest.approx(0.8)
    assert not pool.can_allocate(2)
    with pytest.raises(RuntimeError, match="can_allocate"):
        pool.allocate(2)


def test_pool_rejects_empty():
    with pytest.raises(ValueError):
        BlockPool(0)


def test_allocate_reserves_worst_case_per_stream_then_commit_trims():
    kv = make()
    # 6 new tokens, block size 4: every stream (2 base + 1 routed) gets 2 blocks
    assert kv.can_allocate("a", 6)
    seq = kv.allocate("a", 6)
    assert seq.block_tables == [[0, 1], [2, 3], [4, 5]]
    # only 3 tokens were routed: the routed stream keeps one block, frees block 5
    kv.commit("a", 6, [3])
    assert seq.lengths == [6, 6, 3]
    assert seq.block_tables == [[0, 1], [2, 3], [4]]
    assert kv.pool.num_free == 32 - 5
    # one more token: base streams still have room (6 < 8), routed too (3 < 4)
    kv.allocate("a", 1)
    assert seq.block_tables == [[0, 1], [2, 3], [4]]
    kv.commit("a", 1, [1])
    # next token: routed stream is full (4/4) -> reserves a new block, gets block 6
    kv.allocate("a", 1)
    assert seq.block_tables[2] == [4, 6]
    kv.commit("a", 1, [0])              # not routed: block 6 goes back
    assert seq.block_tables[2] == [4]
    assert seq.lengths == [8, 8, 4]


def test_a_sequence_that_cannot_route_reserves_no_routed_blocks():
    """Budget 0 (``may_route`` False): only the base streams get blocks, and the fit check
    counts only those; a sequence that may route still reserves its routed stream."""
    kv = make(num_blocks=5)
    assert not kv.can_allocate("a", 6)                   # 2 blocks × 3 streams > 5
    assert kv.can_allocate("a", 6, may_route=False)      # 2 blocks × 2 base streams
    seq = kv.allocate("a", 6, may_route=False)
    assert seq.block_tables == [[0, 1], [2, 3], []]
    kv.commit("a", 6, [0])
    assert seq.lengths == [6, 6, 0] and kv.pool.num_free == 1
    assert kv.allocate("a", 1, may_route=False).block_tables[2] == []
    assert kv.pool.num_free == 1                          # the 7th token fits the blocks held
    assert not kv.can_allocate("b", 1)                    # one block per stream: 3 > 1


def test_can_allocate_counts_all_streams_and_free_returns_everything():
    kv = make(num_blocks=6, block_size=4)
    assert kv.can_allocate("a", 8)          # 2 blocks x 3 streams = 6
    assert not kv.can_allocate("a", 9)      # 3 x 3 = 9 > 6
    kv.allocate("a", 8)
    assert kv.pool.num_free == 0
    assert not kv.can_allocate("b", 1)
    kv.free("a")
    assert kv.pool.num_free == 6 and kv.num_sequences == 0
    kv.free("a")                            # idempotent
    assert kv.pool.num_free == 6
