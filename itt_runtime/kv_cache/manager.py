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


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class SequenceKV:
    """Block table and stored-token count of each stream of one sequence."""

    block_tables: list[list[int]]
    lengths: list[int]

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
    _tables: dict[str, SequenceKV] = field(default_factory=dict)

    @property
    def num_routed_streams(self) -> int:
        return self.num_streams - self.num_base_streams

    def get(self, seq_id: str) -> SequenceKV:
        return self._tables[seq_id]

    def _needed(self, kv: SequenceKV, num_new: int) -> list[int]:
        """Blocks each stream must gain to hold ``num_new`` more tokens (worst case)."""
        return [max(0, cdiv(length + num_new, self.block_size) - len(table))
                for length, table in zip(kv.lengths, kv.block_tables)]

    def can_allocate(self, seq_id: str, num_new: int) -> bool:
        kv = self._tables.get(seq_id) or SequenceKV.empty(self.num_streams)
        return self.pool.can_allocate(sum(self._needed(kv, num_new)))

    def allocate(self, seq_id: str, num_new: int) -> SequenceKV:
        kv = self._tables.setdefault(seq_id, SequenceKV.empty(self.num_streams))
        needed = self._needed(kv, num_new)
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
        for s in range(self.num_base_streams):
            kv.lengths[s] += num_new
        for k, count in enumerate(routed_counts):
            s = self.num_base_streams + k
            kv.lengths[s] += count
            keep = cdiv(kv.lengths[s], self.block_size)
            if len(kv.block_tables[s]) > keep:
                self.pool.free(kv.block_tables[s][keep:])
                del kv.block_tables[s][keep:]

    def free(self, seq_id: str) -> None:
        kv = self._tables.pop(seq_id, None)
        if kv is not None:
            for table in kv.block_tables:
                self.pool.free(table)

    @property
    def num_sequences(self) -> int:
        return len(self._tables)
