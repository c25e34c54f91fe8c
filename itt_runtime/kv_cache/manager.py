"""Per-sequence KV streams over the shared block pool (ITT_SPEC "KV cache").

A sequence has ``num_streams`` streams: one per layer for the base step (every token) and one
per (ITT layer, routed step) holding only the tokens routed there. How many tokens a routed
stream gains in a step is only known once the router has run, so ``allocate`` reserves the
worst case (every new token routed) and ``commit`` hands back what the step did not use.
Plain Python, no torch: the runner only reads ``block_tables`` and ``lengths``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from itt_runtime.kv_cache.block_pool import BlockPool
from itt_runtime.kv_cache.prefix_cache import CacheNode, PrefixCache


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class SequenceKV:
    """Block table and stored-token count of each stream of one sequence."""

    block_tables: list[list[int]]
    lengths: list[int]
    # Blocks being copied into this sequence's streams at its next step (prefix caching):
    # held until that step is committed, so that nothing reuses them before the copy.
    copy_sources: list[int] = field(default_factory=list)

    @classmethod
    def empty(cls, num_streams: int) -> SequenceKV:
        return cls([[] for _ in range(num_streams)], [0] * num_streams)

    @property
    def num_blocks(self) -> int:
        return sum(len(t) for t in self.block_tables)


@dataclass
class KVCacheManager:
    pool: BlockPool
    block_size: int
    num_streams: int
    num_base_streams: int
    enable_prefix_caching: bool = False
    _tables: dict[str, SequenceKV] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prefix_cache = (PrefixCache(self.pool, self.block_size)
                             if self.enable_prefix_caching else None)

    @property
    def num_routed_streams(self) -> int:
        return self.num_streams - self.num_base_streams

    def get(self, seq_id: str) -> SequenceKV:
        return self._tables[seq_id]

    def _needed(self, kv: SequenceKV, num_new: int, may_route: bool) -> list[int]:
        """Blocks each stream must gain to hold ``num_new`` more tokens (worst case: every
        token routed at every step). A sequence that cannot route (budget 0) reserves
        nothing in its routed streams, which would otherwise take a block each, every step,
        to give it back at the commit."""
        streams = len(kv.lengths) if may_route else self.num_base_streams
        needed = [max(0, cdiv(length + num_new, self.block_size) - len(table))
                  for length, table in zip(kv.lengths[:streams], kv.block_tables[:streams])]
        return needed + [0] * (len(kv.lengths) - streams)

    def _available(self) -> int:
        """Free blocks, plus those only the prefix cache holds (evicted on demand)."""
        return self.pool.num_free + (self.pool.num_evictable if self.prefix_cache else 0)

    def can_allocate(self, seq_id: str, num_new: int, adopting: CacheNode | None = None,
                     may_route: bool = True) -> bool:
        """Whether ``num_new`` more tokens fit; with ``adopting``, for a new sequence that
        starts from that cached node (its partial routed blocks are copied). ``may_route``
        False: the tokens cannot be routed (``Sequence.may_route``)."""
        if adopting is not None:
            kv = SequenceKV([list(t) for t in adopting.block_tables], list(adopting.lengths))
            needed = len(self._partial(adopting)) + sum(self._needed(kv, num_new, may_route))
            # The node's blocks will be held by the sequence: no longer evictable.
            held = [b for t in adopting.block_tables for b in t]
            return needed <= self._available() - self.pool.count_evictable(held)
        kv = self._tables.get(seq_id) or SequenceKV.empty(self.num_streams)
        return sum(self._needed(kv, num_new, may_route)) <= self._available()

    def _make_room(self, n: int) -> None:
        if self.prefix_cache is not None and self.pool.num_free < n:
            self.prefix_cache.evict(n)

    def allocate(self, seq_id: str, num_new: int, may_route: bool = True) -> SequenceKV:
        kv = self._tables.setdefault(seq_id, SequenceKV.empty(self.num_streams))
        needed = self._needed(kv, num_new, may_route)
        self._make_room(sum(needed))
        blocks = self.pool.allocate(sum(needed))
        start = 0
        for table, n in zip(kv.block_tables, needed):
            table.extend(blocks[start:start + n])
            start += n
        return kv

    def commit(self, seq_id: str, num_new: int, routed_counts: list[int]) -> None:
        """Record a finished step: base streams gained ``num_new`` tokens, routed stream k
        gained ``routed_counts[k]``. Reserved blocks a routed stream did not fill go back."""
        kv = self._tables[seq_id]
        self.pool.free(kv.copy_sources)
        kv.copy_sources = []
        for s in range(self.num_base_streams):
            kv.lengths[s] += num_new
        for k, count in enumerate(routed_counts):
            s = self.num_base_streams + k
            kv.lengths[s] += count
            keep = cdiv(kv.lengths[s], self.block_size)
            if len(kv.block_tables[s]) > keep:
                self.pool.free(kv.block_tables[s][keep:])
                del kv.block_tables[s][keep:]

    # ---- prefix caching ---------------------------------------------------------------------
    def _partial(self, node: CacheNode) -> list[int]:
        """Streams whose last cached block is partly filled (the adopter appends into it)."""
        return [s for s, n in enumerate(node.lengths) if n % self.block_size]

    def adopt(self, seq_id: str, node: CacheNode) -> list[tuple[int, int]]:
        """Start ``seq_id`` from a cached node: its streams share the node's blocks, except
        that each partly filled last block is replaced by a fresh copy. Returns the block
        copies (source, destination) the runner must make before the sequence's first step.
        Call can_allocate(..., adopting=node) first."""
        assert seq_id not in self._tables, "only a sequence with no KV adopts a prefix"
        tables = [list(t) for t in node.block_tables]
        for t in tables:                 # held first, so that making room cannot evict them
            self.pool.incref(t)
        partial = self._partial(node)
        self._make_room(len(partial))
        fresh = self.pool.allocate(len(partial))
        copies = []
        for s, dst in zip(partial, fresh):
            copies.append((tables[s][-1], dst))
            tables[s][-1] = dst          # the source stays referenced until the commit
        self._tables[seq_id] = SequenceKV(tables, list(node.lengths),
                                          copy_sources=[src for src, _ in copies])
        return copies

    def cache_prefix(self, seq_id: str, key: bytes, parent_key: bytes | None,
                     num_tokens: int, lengths: list[int],
                     prompt_logprobs: list | None = None,
                     prompt_logprobs_k: int | None = None) -> None:
        """Cache the state of ``seq_id``'s streams after its first ``num_tokens`` tokens
        (``lengths``: each stream's length at that point; ``parent_key``: the key one block
        earlier, None for the first block)."""
        assert self.prefix_cache is not None
        self.prefix_cache.insert(key, parent_key, num_tokens,
                                 self._tables[seq_id].block_tables, lengths, prompt_logprobs,
                                 prompt_logprobs_k)

    def free(self, seq_id: str) -> None:
        kv = self._tables.pop(seq_id, None)
        if kv is not None:
            for table in kv.block_tables:
                self.pool.free(table)
            self.pool.free(kv.copy_sources)

    @property
    def num_sequences(self) -> int:
        return len(self._tables)
