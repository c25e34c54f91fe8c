"""An engine step as one pure function of tensors: the shape that CPU compiles (cpu_compile.py,
aot_compile.py). Decode rows and prompt (or verify) chunks are all token rows.

The step is a padded, sync-free masked step (as cuda_graphs.py's), with two differences that
make it a pure function (no in-place write inside it), which is what lets inductor compile it
without copying the KV cache (functionalisation copies a mutated input whole):

  * the step's own keys and values are not written before attention: each row attends to
    its sequence's cached keys (stream positions 0 … length−1, stored before the step) plus
    a (rows × rows) block of the step's new keys, masked to the row itself and the earlier
    rows of the same sequence (for a routed stream, those that were routed). So no mask is
    built from positions and block tables per step: the valid cached keys are
    ``arange(L) < length``, a broadcast compare that fuses into the softmax;
  * the step returns every stream's new K/V with their cache slots, and the caller writes
    them all with one ``index_copy_`` per cache tensor after the step (``write_new_kv``).

Routed steps run masked (every row computes the block, routed rows keep it; the K/V of an
unrouted row goes to the scratch slot), so no shape depends on the routing; a routed row's
stream position is its sequence's stored length plus the routed rows before it in the step.
A padding row is a sequence of its own with length 0, the scratch block as its block table
and +inf thresholds: it attends to itself only, is never routed, and writes to scratch.
"""

from __future__ import annotations

import math

import torch

from itt_runtime.model.itt import ITTModel


def attend_rows(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                length: torch.Tensor, sees: torch.Tensor) -> torch.Tensor:
    """Each row's query over its sequence's cached stream plus the step's own new keys.

    q (B, H, D); k_new, v_new (B, KV, D); k_cache, v_cache (blocks, bs, KV, D); table (B, W)
    block ids; length (B,) keys stored before this step; sees (B, B) bool: row i attends to
    row j's new key (its own, and earlier tokens of the same sequence in this step). Returns
    (B, H·D).

    The cached part is written as broadcast products and sums rather than matmuls:
    compiled, inductor turns each into one loop that reads the cached keys and values through
    the block table in place, where ``einsum`` would first gather every row's blocks into a
    new tensor (the largest cost of a 32-row compiled decode step). The new keys are a
    (B, B) block: a diagonal for decode rows, causal within a prompt chunk.

    Scores are laid out heads first, keys last, (B, KV, rep, keys): the softmax's max, exp
    and sum then run along contiguous keys, eight to a vector. With the keys before the
    heads, inductor vectorised those loops over the ``rep`` (2) query heads of a KV head,
    two lanes in eight: the attention of a 48-token prompt chunk took 1.4-1.7x as long
    (docs/perf-notes.md, 2026-12-07, evening)."""
    B, H, D = q.shape
    KV = k_new.shape[1]
    rep = H // KV
    k = k_cache[table].flatten(1, 2).permute(0, 2, 1, 3)             # (B, KV, L, D)
    v = v_cache[table].flatten(1, 2).permute(0, 2, 1, 3)
    L = k.shape[2]
    qg = q.view(B, KV, rep, D) * (1.0 / math.sqrt(D))                # heads grouped by KV head
    s_cache = (qg[:, :, :, None, :] * k[:, :, None]).sum(-1)         # (B, KV, rep, L)
    valid = torch.arange(L, device=q.device)[None, :] < length[:, None]   # (B, L)
    s_cache = s_cache.masked_fill(~valid[:, None, None, :], float("-inf"))
    s_new = torch.einsum("ikrd,jkd->ikrj", qg, k_new)               # (B, KV, rep, B)
    s_new = s_new.masked_fill(~sees[:, None, None, :], float("-inf"))
    top = torch.maximum(s_cache.amax(-1), s_new.amax(-1))           # softmax over both parts
    p_cache = torch.exp(s_cache - top[..., None])
    p_new = torch.exp(s_new - top[..., None])
    o = (p_cache[..., None] * v[:, :, None]).sum(3) \
        + torch.einsum("ikrj,jkd->ikrd", p_new, v_new)
    return (o / (p_cache.sum(-1) + p_new.sum(-1))[..., None]).reshape(B, H * D)


def rows_step(model: ITTModel, k_cache: torch.Tensor, v_cache: torch.Tensor,
              ids: torch.Tensor, pos: torch.Tensor, first: torch.Tensor,
              tables: torch.Tensor, lengths: torch.Tensor, thresholds: torch.Tensor,
              logit_rows: torch.Tensor, routable: bool, packed: bool = False):
    """One step over token rows: decode rows (one token of a sequence each) and prompt or
    verify chunks (consecutive rows of one sequence, in position order), in any mix.

    ids, pos (B,) token and position of each row; first (B,) the row index of its sequence's
    first row in this step; tables (B, streams, W) block ids and lengths (B, streams) tokens
    each stream stored before this step, of the row's sequence (the same for every row of a
    chunk: one indirection, so that inductor reads the cache through the table in place);
    thresholds (B, routed streams) router-logit thresholds (+inf: never routed);
    logit_rows (S,) rows whose logits are returned. ``routable`` False skips the routed steps
    (every row at budget 0). ``packed``: the matmuls through model/packed_linear.py (the
    variants of several rows, and of one row where its kernel is built:
    aot_compile.packed_step).
    The cache's last block is scratch (runner/attention.KVCache),
    taken from its shape so that no pool size is baked into a compiled step.

    Returns logits (S, vocab) fp32, routed (B, routed streams) long 0/1 per row and step,
    new_k, new_v (streams written × B, KV, D) and their flat cache slots (streams written ×
    B,): the base streams, then (if routable) every routed stream.
    """
    cfg = model.cfg
    bs = k_cache.shape[1]
    scratch_slot = (k_cache.shape[0] - 1) * bs
    B = ids.shape[0]
    x = model.embed_tokens(ids)                                       # (B, d)
    cos, sin = model.rotary(pos, x.dtype)                             # (B, 1, D)
    new_k: list[torch.Tensor] = []
    new_v: list[torch.Tensor] = []
    slots: list[torch.Tensor] = []
    routed_all: list[torch.Tensor] = []
    row = torch.arange(B, device=ids.device)
    same = first[:, None] == first[None, :]                           # same sequence
    causal = same & (row[None, :] <= row[:, None])                    # (B, B): j <= i
    # Base stream of every layer: the token's own position; the cache holds the positions
    # before its sequence's first row.
    base_len = pos[first]
    base_slot_in_block = pos % bs
    base_blk = torch.div(pos, bs, rounding_mode="floor")

    def block_delta(block, x, stream: int, cached: torch.Tensor, slot: torch.Tensor,
                    sees: torch.Tensor):
        q, k, v = block.project_qkv(x, cos, sin, packed)              # (B, H|KV, D)
        new_k.append(k)
        new_v.append(v)
        slots.append(slot)
        attn = attend_rows(q, k, v, k_cache, v_cache, tables[:, stream], cached, sees)
        return block.finish(x, attn, packed)

    itt_index = 0
    for layer_idx, layer in enumerate(model.itt_layer_list):
        slot = tables[:, layer_idx].gather(1, base_blk[:, None])[:, 0] * bs \
            + base_slot_in_block
        x = layer.base_update(x, block_delta(layer.block, x, layer_idx, base_len, slot, causal))
        if layer.think_steps == 1:
            continue
        if not routable:             # budget 0 everywhere: no routed step, no routed K/V
            itt_index += 1
            continue
        for t in range(1, layer.think_steps):
            k_idx = itt_index * cfg.n_routed_steps + (t - 1)
            stream = cfg.n_layers + k_idx
            logits_r = layer.router_logits(t, x)                      # (B,)
            routed = logits_r.float() > thresholds[:, k_idx]          # (B,) bool
            r = routed.long()
            before = torch.cumsum(r, 0) - r                           # routed rows before i
            cached = lengths[:, stream]
            spos = cached + before - before[first]                    # next free positions
            own = tables[:, stream].gather(
                1, torch.div(spos, bs, rounding_mode="floor")[:, None])[:, 0] * bs + spos % bs
            slot = torch.where(routed, own, torch.full_like(own, scratch_slot))
            # A routed row sees the routed rows before it in its sequence, and itself.
            sees = (causal & routed[None, :]) | (row[None, :] == row[:, None])
            delta = block_delta(layer.block, x, stream, cached, slot, sees)
            stepped = x + layer.routed_increment(t, torch.sigmoid(logits_r), delta)
            x = torch.where(routed[:, None], stepped, x)
            routed_all.append(routed)
        itt_index += 1
    logits = model.output_logits(x[logit_rows], packed)              # (S, vocab) fp32
    K = cfg.max_extra_steps
    if routed_all:
        routed_t = torch.stack(routed_all, 1).long()                  # (B, K)
    else:
        routed_t = torch.zeros(B, K, dtype=torch.long, device=x.device)
    # new_k, new_v and slots were appended together, one entry per block application.
    return logits, routed_t, torch.cat(new_k), torch.cat(new_v), torch.cat(slots)


def write_new_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, new_k: torch.Tensor,
                 new_v: torch.Tensor, slots: torch.Tensor) -> None:
    """The step's K/V into the cache: one index_copy_ per tensor. Several unrouted rows may
    share the scratch slot; which one lands there does not matter (scratch is never read)."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, new_k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, new_v)
