"""Automatic prefix caching over the per-step KV streams. Plain Python, no torch.

A *node* is the KV state of every stream of a sequence after its first ``k·block_size``
tokens: per stream, the blocks that hold its first ``lengths[s]`` tokens. Base streams hold
every token, so a node's base blocks are k full blocks. A routed stream holds only the
prefix's routed tokens, so its last block is usually partly filled; a sequence that adopts
the node shares the full blocks and gets a private copy of the partial one (copy-on-write;
the runner copies the block's K/V before the step), because it will append into it.

The key of the node after block k is a hash chain: ``h_0 = H(thresholds)``, ``h_k =
H(h_{k−1}, tokens of block k)``. Why that is exact: the K/V of a token in any stream is a
function of the tokens up to it (causal attention, RoPE at the absolute position) and, from
the first routed step on, of the routing decisions of those tokens — and a routing decision
``r_t(y) > θ`` depends only on the token's own past and the threshold of that stream
(ITT_SPEC: causal routing). So (tokens, per-stream thresholds) determine every stream's
content, and two requests whose threshold vectors are equal share nodes whatever their
budgets are called (a dense model has no thresholds: every request shares). The streams
before the first routed step (the base streams of the layers up to the first ITT layer) do
not depend on the thresholds, but reusing them at another budget would need the hidden
state after that layer, which the cache does not keep; so nodes are not shared across
different threshold vectors (docs/engine.md).

Prompt logprobs (echo scoring) ride along: a node made by a request that wanted them keeps the
entries of its positions 1 … k·block_size − 1, which its tokens determine. The entry of the
position just after the node is different: the distribution comes from the node's last token,
but the entry is keyed by the *next* token, which is not part of the key. The node keeps that
distribution's top-k and the logprob of every next token a request computed there
(``NextTokenLogprobs``); a request whose next token is not among them cannot adopt the node
(nothing could recompute that position without its predecessor), and takes the node one block
earlier instead.

Nodes are evicted least recently used when the pool needs blocks; a node only drops its own
references, so a block still used by a sequence (or another node) stays.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from itt_runtime.kv_cache.block_pool import BlockPool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def root_hash(thresholds: Sequence[float]) -> bytes:
    return hashlib.blake2b(struct.pack(f"<{len(thresholds)}d", *thresholds),
                           digest_size=16).digest()


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    return hashlib.blake2b(parent + struct.pack(f"<{len(tokens)}q", *tokens),
                           digest_size=16).digest()


Entry = dict[int, float]          # {token: logprob}: the position's own token first, then top-k


@dataclass
class NextTokenLogprobs:
    """What is known of the prompt-logprob distribution at the position right after a node:
    its top-k ids (best first) and the logprob of every token known there (the top-k, and the
    next token of each request that computed the position)."""
    top: list[int]
    known: dict[int, float]

    @classmethod
    def from_entry(cls, entry: Entry, k: int) -> NextTokenLogprobs:
        """From one request's entry there (``{its token: logprob, top-k…}``, sampler.py's
        ``logprob_entries``): with k + 1 items its token is outside the top-k."""
        ids = list(entry)
        top = ids[1:] if len(ids) == k + 1 else sorted(ids, key=lambda t: -entry[t])
        return cls(top, dict(entry))

    def learn(self, entry: Entry) -> None:
        """Add the token (and logprob) of another request's entry at this position."""
        token = next(iter(entry))
        self.known.setdefault(token, entry[token])

    def entry_for(self, token: int) -> Entry | None:
        """The entry a request whose token here is ``token`` would compute; None if that
        token's logprob is not known."""
        if token not in self.known:
            return None
        entry = {token: self.known[token]}
        for t in self.top:
            entry.setdefault(t, self.known[t])
        return entry


@dataclass(eq=False)
class CacheNode:
    """The state after ``num_tokens`` tokens, stored as a delta on its parent (the node one
    block earlier on the same chain): per stream, the parent's first ``keep[s]`` blocks (its
    full ones) followed by this node's ``own[s]`` blocks. A node holds references to its own
    blocks only, so caching every block boundary of a prompt costs O(streams) per boundary;
    a node with children is never evicted (they use its blocks)."""
    key: bytes
    num_tokens: int                          # k · block_size
    parent: CacheNode | None
    keep: list[int]                          # per stream: blocks taken from the parent
    own: list[list[int]]                     # per stream: blocks this node references
    lengths: list[int]                       # per stream: tokens stored
    # Prompt logprob entries of positions 1 … num_tokens − 1 (index 0 unused), what is known
    # at position num_tokens, and the top-k they were computed for; None if no sequence that
    # computed the node had them.
    prompt_logprobs: list[Entry | None] | None = None
    next_logprobs: NextTokenLogprobs | None = None
    prompt_logprobs_k: int | None = None
    children: int = 0

    def gives_logprobs(self, tokens: Sequence[int], k: int) -> bool:
        """Whether the node has the prompt logprobs a sequence with ``tokens`` that wants
        top-``k`` needs: for that k, and its own token's at position num_tokens."""
        return (self.prompt_logprobs_k == k and self.next_logprobs is not None
                and tokens[self.num_tokens] in self.next_logprobs.known)

    def adopt_logprobs(self, tokens: Sequence[int], k: int) -> list[Entry | None]:
        """Prompt logprob entries 0 … num_tokens for such a sequence (``gives_logprobs``):
        the node's, and the entry of position num_tokens for the sequence's own token."""
        assert self.prompt_logprobs is not None and self.next_logprobs is not None \
            and self.gives_logprobs(tokens, k)
        last = self.next_logprobs.entry_for(tokens[self.num_tokens])
        return [*self.prompt_logprobs, last]

    def add_logprobs(self, entries: Sequence[Entry | None], k: int) -> None:
        """Record prompt logprob entries 0 … num_tokens computed by a sequence through this
        node (the first to bring them, or another next token for the same k)."""
        last = entries[self.num_tokens]
        assert last is not None, "position num_tokens ≥ 1 has an entry"
        if self.next_logprobs is None:
            self.prompt_logprobs = list(entries[:self.num_tokens])
            self.prompt_logprobs_k = k
            self.next_logprobs = NextTokenLogprobs.from_entry(last, k)
        elif self.prompt_logprobs_k == k:
            self.next_logprobs.learn(last)

    @property
    def block_tables(self) -> list[list[int]]:
        """Per stream, every block holding its first ``lengths[s]`` tokens."""
        chain = [self]
        while chain[-1].parent is not None:
            chain.append(chain[-1].parent)
        tables: list[list[int]] = [[] for _ in self.own]
        for node in reversed(chain):             # root first: truncate, then extend, in place
            for table, keep, own in zip(tables, node.keep, node.own):
                del table[keep:]
                table.extend(own)
        return tables


class PrefixCache:
    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self.nodes: dict[bytes, CacheNode] = {}
        # The evictable nodes (no children), least recently used first: eviction takes the
        # first, in O(1), however many parents the cache holds.
        self.leaves: OrderedDict[bytes, CacheNode] = OrderedDict()
        self.queries = 0                     # tokens looked up
        self.hits = 0                        # tokens found

    def __len__(self) -> int:
        return len(self.nodes)

    def lookup(self, hashes: list[bytes], max_tokens: int, tokens: Sequence[int] = (),
               prompt_logprobs_k: int | None = None) -> CacheNode | None:
        """The longest cached node among ``hashes`` (the chain of the sequence ``tokens``)
        that covers at most ``max_tokens`` tokens and, if prompt logprobs are wanted, can give
        them for the same top-k, its last position included (``CacheNode.gives_logprobs``).
        (The scheduler counts queries and hits once it admits.)"""
        best = None
        for k in range(min(len(hashes), max_tokens // self.block_size), 0, -1):
            node = self.nodes.get(hashes[k - 1])
            if node is None:
                continue
            if prompt_logprobs_k is not None \
                    and not node.gives_logprobs(tokens, prompt_logprobs_k):
                continue
            best = node
            break
        if best is not None and best.key in self.leaves:
            self.leaves.move_to_end(best.key)
        return best

    def count(self, queried: int, hit: int) -> None:
        """One admitted sequence's lookup: ``queried`` tokens, ``hit`` of them cached."""
        self.queries += queried
        self.hits += hit

    def insert(self, key: bytes, parent_key: bytes | None, num_tokens: int,
               block_tables: list[list[int]], lengths: list[int],
               prompt_logprobs: list | None = None,
               prompt_logprobs_k: int | None = None) -> bool:
        """Cache the first ``lengths[s]`` tokens of each stream of ``block_tables`` (a
        sequence's tables), as a delta on the node ``parent_key`` if it is cached. The parent
        may hold other blocks than the sequence's (another sequence cached that key first);
        their content is the same, since the key determines it. ``prompt_logprobs``: the
        sequence's entries 0 … ``num_tokens``, for top-``prompt_logprobs_k``. False if ``key``
        is cached already (its node then learns the entries, see ``add_logprobs``)."""
        node = self.nodes.get(key)
        if node is not None:
            if key in self.leaves:
                self.leaves.move_to_end(key)
            if prompt_logprobs is not None and prompt_logprobs_k is not None:
                node.add_logprobs(prompt_logprobs, prompt_logprobs_k)
            return False
        bs = self.block_size
        tables = [t[:cdiv(n, bs)] for t, n in zip(block_tables, lengths)]
        parent = self.nodes.get(parent_key) if parent_key is not None else None
        keep = [n // bs for n in parent.lengths] if parent else [0] * len(tables)
        own = [t[k:] for t, k in zip(tables, keep)]
        for t in own:
            self.pool.incref(t, by_cache=True)
        if parent is not None:
            parent.children += 1
            self.leaves.pop(parent.key, None)
        node = CacheNode(key, num_tokens, parent, keep, own, list(lengths))
        if prompt_logprobs is not None and prompt_logprobs_k is not None:
            node.add_logprobs(prompt_logprobs, prompt_logprobs_k)
        self.nodes[key] = self.leaves[key] = node
        return True

    def evict(self, num_free_wanted: int) -> None:
        """Drop least recently used leaf nodes (a node with children holds their blocks)
        until the pool has ``num_free_wanted`` free blocks or no node is left."""
        while self.pool.num_free < num_free_wanted and self.leaves:
            _, node = self.leaves.popitem(last=False)
            del self.nodes[node.key]
            for t in node.own:
                self.pool.free(t, by_cache=True)
            parent = node.parent
            if parent is not None:
                parent.children -= 1
                if parent.children == 0:          # evictable now (as if just used)
                    self.leaves[parent.key] = parent

    def clear(self) -> None:
        self.evict(self.pool.num_blocks + 1)
