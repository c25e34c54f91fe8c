"""A decode step as one pure function of tensors: the shape that ``torch.compile`` compiles on
CPU (cpu_compile.py).

Every row of a decode step computes exactly one new token. The step is the padded, sync-free
masked step of cuda_graphs.py, with two differences that make it a pure function (no
in-place write inside it), which is what lets inductor compile it without copying the KV
cache (functionalisation copies a mutated input whole):

  * the new token's own key and value are not written before attention: attention takes the
    cached keys (stream positions 0 … length−1) plus the token's own key as one extra score
    column. So a decode row needs no mask tensor built from positions and block tables per
    step: the valid cached keys are ``arange(L) < length``, a broadcast compare that fuses
    into the softmax;
  * the step returns every stream's new K/V with their cache slots, and the caller writes
    them all with one ``index_copy_`` per cache tensor after the step (``write_new_kv``).

Routed steps run masked (every row computes the block, routed rows keep it; the K/V of an
unrouted row goes to the scratch slot), so no shape depends on the routing. A padding row has
length 0, the scratch block as its block table and +inf thresholds: it attends to itself
only, is never routed, and writes to scratch.
"""

from __future__ import annotations

import math

import torch

from itt_runtime.model.itt import ITTModel


def attend_decode(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                  length: torch.Tensor) -> torch.Tensor:
    """One query per row over that row's cached stream plus its own new key.

    q (B, H, D); k_new, v_new (B, KV, D); k_cache, v_cache (blocks, bs, KV, D); table (B, W)
    block ids; length (B,) keys stored before this step. Returns (B, H·D).

    Written as broadcast products and sums rather than matmuls: compiled, inductor turns
    each into one loop that reads the cached keys and values through the block table in
    place, where ``einsum`` would first gather every row's blocks into a new tensor (the
    largest cost of a 32-row compiled step) and then call ``bmm``."""
    B, H, D = q.shape
    KV = k_new.shape[1]
    rep = H // KV
    k = k_cache[table].flatten(1, 2)                                 # (B, L, KV, D)
    v = v_cache[table].flatten(1, 2)
    L = k.shape[1]
    qg = q.view(B, KV, rep, D) * (1.0 / math.sqrt(D))                # heads grouped by KV head
    s_cache = (qg[:, None] * k[:, :, :, None, :]).sum(-1)           # (B, L, KV, rep)
    valid = torch.arange(L, device=q.device)[None, :] < length[:, None]   # (B, L)
    s_cache = s_cache.masked_fill(~valid[:, :, None, None], float("-inf"))
    s_self = (qg * k_new[:, :, None, :]).sum(-1)                    # (B, KV, rep)
    top = torch.maximum(s_cache.amax(1), s_self)                    # softmax over L + 1 keys
    p_cache = torch.exp(s_cache - top[:, None])
    p_self = torch.exp(s_self - top)
    o = (p_cache[..., None] * v[:, :, :, None, :]).sum(1) + p_self[..., None] * v_new[:, :, None]
    return (o / (p_cache.sum(1) + p_self)[..., None]).reshape(B, H * D)


def decode_step(model: ITTModel, k_cache: torch.Tensor, v_cache: torch.Tensor,
                ids: torch.Tensor, pos: torch.Tensor, tables: torch.Tensor,
                lengths: torch.Tensor, thresholds: torch.Tensor, routable: bool):
    """One decode token per row.

    ids, pos (B,); tables (B, streams, W); lengths (B, streams) tokens stored before this
    step; thresholds (B, routed streams) router-logit thresholds (+inf: never routed).
    ``routable`` False skips the routed steps (every row at budget 0). The cache's last block
    is scratch (runner/attention.KVCache), taken from its shape so that no pool size is baked
    into a compiled step.

    Returns logits (B, vocab) fp32, extra_steps (B,), routed_counts (B, routed streams),
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
    # Base stream of every layer: the token's own position.
    base_slot_in_block = pos % bs
    base_blk = torch.div(pos, bs, rounding_mode="floor")

    def block_delta(block, x, stream: int, spos: torch.Tensor, slot: torch.Tensor):
        q, k, v = block.project_qkv(x, cos, sin)                      # (B, H|KV, D)
        new_k.append(k)
        new_v.append(v)
        slots.append(slot)
        attn = attend_decode(q, k, v, k_cache, v_cache, tables[:, stream], spos)
        return block.finish(x, attn)

    itt_index = 0
    for layer_idx, layer in enumerate(model.itt_layer_list):
        slot = tables[:, layer_idx].gather(1, base_blk[:, None])[:, 0] * bs + base_slot_in_block
        x = layer.base_update(x, block_delta(layer.block, x, layer_idx, pos, slot))
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
            spos = lengths[:, stream]                                 # next free position
            own = tables[:, stream].gather(1, torch.div(spos, bs, rounding_mode="floor")
                                           [:, None])[:, 0] * bs + spos % bs
            slot = torch.where(routed, own, torch.full_like(own, scratch_slot))
            delta = block_delta(layer.block, x, stream, spos, slot)
            stepped = x + layer.routed_increment(t, torch.sigmoid(logits_r), delta)
            x = torch.where(routed[:, None], stepped, x)
            routed_all.append(routed)
        itt_index += 1
    logits = model.output_logits(x)                                   # (B, vocab) fp32
    K = cfg.max_extra_steps
    if routed_all:
        routed_t = torch.stack(routed_all, 1).long()                  # (B, K)
    else:
        routed_t = torch.zeros(B, K, dtype=torch.long, device=x.device)
    # new_k, new_v and slots were appended together, one entry per block application.
    return (logits, routed_t.sum(1), routed_t, torch.cat(new_k), torch.cat(new_v),
            torch.cat(slots))


def write_new_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, new_k: torch.Tensor,
                 new_v: torch.Tensor, slots: torch.Tensor) -> None:
    """The step's K/V into the cache: one index_copy_ per tensor. Several unrouted rows may
    share the scratch slot; which one lands there does not matter (scratch is never read)."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, new_k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, new_v)
