"""Attention over paged KV streams, for a batch of sequences with varying query counts.

Queries arrive padded per sequence, (B, Q, H, D); keys and values are gathered from the
shared cache through each sequence's block table. Query i of sequence b sees the keys at
stream positions 0 … qpos[b, i] (causal within the stream), which is all a routed stream
needs too: it holds only routed tokens, in order, so "causal" is "earlier in the stream".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """One K and one V tensor shared by every stream: (num_blocks + 1, block_size, KV, D).

    Blocks 0 … num_blocks−1 belong to the block pool. The extra last one is scratch: writes
    that must go somewhere but are never read (unrouted tokens of a masked routed step,
    padding rows of a captured decode step) land there.
    """

    def __init__(self, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_blocks + 1, block_size, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.scratch_block = num_blocks
        self.scratch_slot = num_blocks * block_size

    @staticmethod
    def bytes_per_block(block_size: int, n_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * block_size * n_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks (source, destination): a cached prefix's partly filled block
        becomes the adopting sequence's own (copy-on-write)."""
        src = torch.tensor([s for s, _ in pairs], device=self.k.device)
        dst = torch.tensor([d for _, d in pairs], device=self.k.device)
        self.k.index_copy_(0, dst, self.k.index_select(0, src))
        self.v.index_copy_(0, dst, self.v.index_select(0, src))

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots (N,) flat slot ids; k, v (N, KV, D)."""
        self.k.view(-1, *self.k.shape[2:]).index_copy_(0, slots, k)
        self.v.view(-1, *self.v.shape[2:]).index_copy_(0, slots, v)

    def attend(self, q: torch.Tensor, qpos: torch.Tensor, block_table: torch.Tensor) \
            -> torch.Tensor:
        """q (B, Q, H, D); qpos (B, Q) stream position of each query (padding: 0);
        block_table (B, nb). Returns (B, Q, H, D)."""
        B, Q, H, D = q.shape
        # (B, L, KV, D) by whole blocks: index_select is ~5x faster than k[block_table] on CPU.
        k = self.k.index_select(0, block_table.flatten()).view(B, -1, *self.k.shape[2:])
        v = self.v.index_select(0, block_table.flatten()).view(B, -1, *self.v.shape[2:])
        KV, L = k.shape[2], k.shape[1]
        rep = H // KV
        # Group query heads by their KV head so that K/V are never copied per head.
        qg = q.view(B, Q, KV, rep, D).permute(0, 2, 3, 1, 4).reshape(B, KV, rep * Q, D)
        mask = torch.arange(L, device=q.device)[None, None, :] <= qpos[:, :, None]   # (B, Q, L)
        mask = mask[:, None, None].expand(B, 1, rep, Q, L).reshape(B, 1, rep * Q, L)
        o = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask)          # (B, KV, rep*Q, D)
        return o.view(B, KV, rep, Q, D).permute(0, 3, 1, 2, 4).reshape(B, Q, H, D)
