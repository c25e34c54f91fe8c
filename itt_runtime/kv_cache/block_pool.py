"""The shared KV block pool: plain Python, no torch. Block ids index the runner's cache tensors.

Blocks are reference counted: a sequence holds one reference to each block of its streams,
and the prefix cache (prefix_cache.py) holds one per cached node that lists the block. A block
returns to the free list when its last reference goes. Blocks referenced by the prefix cache
alone are *evictable*: the pool counts them, so that the KV manager can tell whether evicting
cache nodes would make room.
"""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Free-list allocator over block ids 0 … num_blocks-1 (FIFO: freed blocks go to the back)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks            # all references
        self._cache_refs = [0] * num_blocks      # of which the prefix cache's
        self.num_evictable = 0                   # blocks referenced by the cache only

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by sequences, 0 … 1 (cache-only blocks count as free:
        they are given back as soon as anything needs them)."""
        return 1.0 - (len(self._free) + self.num_evictable) / self.num_blocks

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self._free)} free "
                               "(call can_allocate first)")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def incref(self, blocks: list[int], by_cache: bool = False) -> None:
        for b in blocks:
            if self._refs[b] <= 0:
                raise RuntimeError(f"block {b} is free; only a held block can be shared")
            was = self._evictable(b)
            self._refs[b] += 1
            self._cache_refs[b] += by_cache
            self.num_evictable += self._evictable(b) - was

    def free(self, blocks: list[int], by_cache: bool = False) -> None:
        """Drop one reference to each block; a block whose last reference goes is free."""
        for b in blocks:
            if self._refs[b] <= 0 or (by_cache and self._cache_refs[b] <= 0):
                raise RuntimeError(f"block {b} freed more often than it was referenced")
            was = self._evictable(b)
            self._refs[b] -= 1
            self._cache_refs[b] -= by_cache
            self.num_evictable += self._evictable(b) - was
            if self._refs[b] == 0:
                self._free.append(b)

    def count_evictable(self, blocks: list[int]) -> int:
        """How many of ``blocks`` (distinct ids) only the prefix cache holds."""
        return sum(self._evictable(b) for b in set(blocks))

    def refs(self, block: int) -> int:
        return self._refs[block]

    def _evictable(self, b: int) -> int:
        return int(self._refs[b] > 0 and self._refs[b] == self._cache_refs[b])
