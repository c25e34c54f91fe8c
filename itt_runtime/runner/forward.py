"""The ITT forward over the paged cache for one step's batch of scheduled sequences.

The step logic mirrors ``model/itt.py`` (the reference) but computes only the new tokens:

  * tokens are laid out flat: first one token per decoding sequence, then each chunk
    (prompt or recompute) contiguously;
  * at a routed step every token is compared with its own request's threshold, the block runs
    on the routed tokens, and their K/V go to that step's stream at the next free stream
    position;
  * attention runs once for all single-token sequences and once for the multi-token chunks
    (padded to the longest; one call per chunk when that would waste too much).

A routed step runs the block in one of two ways (``StepBatch.masked_routing``):

  * gathered: on exactly the routed tokens. Their number sizes the gather, so the host waits
    for it (one device sync per routed step, free on CPU). Compute ∝ routed tokens.
  * masked: on every token, keeping the result of routed ones only; unrouted tokens write
    their K/V to the cache's scratch slot. No shape depends on the routing, so there is no
    sync and the step can be captured in a CUDA graph. Compute ∝ all tokens — on a GPU a
    decode step is bound by reading the weights, not by rows, so that costs little there.

It returns, per sequence, the routed-token count of each routed stream (for the KV manager),
and per logit row the extra steps of the position that produced it. Sampling, graph dispatch
and the read back to the host are the ModelRunner's (model_runner.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from itt_runtime.config import ModelConfig
from itt_runtime.engine.step import ScheduledSeq
from itt_runtime.kv_cache.manager import SequenceKV
from itt_runtime.model.itt import ITTModel
from itt_runtime.runner.attention import KVCache


@dataclass
class StepBatch:
    """Host-built metadata of one step, moved to the device at once."""

    input_ids: torch.Tensor          # (T,)
    positions: torch.Tensor          # (T,)
    tok_seq: torch.Tensor            # (T,) batch row of each token
    row_start: torch.Tensor          # (B,) flat index of each row's first token
    block_tables: torch.Tensor       # (B, streams, max_blocks)
    stream_lengths: torch.Tensor     # (B, streams) tokens stored before this step
    thresholds: torch.Tensor         # (B, routed streams)
    logit_rows: torch.Tensor         # (S,) flat token indices whose logits are needed
    num_decode: int                  # sequences (= tokens) with one new token, rows 0 … nd-1
    chunk_lens: list[int]            # new tokens of the multi-token rows nd … B-1
    stream_blocks: list[int]         # max blocks over rows, per stream (gather width)
    row_blocks: list[list[int]]      # blocks per (row, stream)
    masked_routing: bool = False     # routed steps: masked (no sync) or gathered
    routable: bool = True            # False: every row has budget 0, routed steps are skipped
    # (T, routed streams) per token, when a row recomputes positions first computed at another
    # budget (elastic thinking + preemption); None: every token uses its row's thresholds.
    token_thresholds: torch.Tensor | None = None


@dataclass
class StreamRows:
    """The tokens one ``_block`` call computes in one KV stream: token j belongs to batch row
    ``rows[j]``, sits at stream position ``positions[j]`` and writes its K/V to
    ``slots[j]``. The first ``num_decode`` tokens are single-token rows; the rest are chunks
    of ``chunk_lens`` tokens for rows num_decode, num_decode + 1, … of the batch."""

    stream: int
    rows: torch.Tensor               # (N,)
    positions: torch.Tensor          # (N,)
    slots: torch.Tensor              # (N,)
    num_decode: int
    chunk_lens: list[int]


@dataclass
class StepOutput:
    logits: torch.Tensor             # (S, vocab) fp32, rows as in StepBatch.logit_rows
    routed_counts: torch.Tensor      # (B, routed streams) tokens routed per stream
    extra_steps: torch.Tensor        # (S,) extra steps of each logit row's position
    routed: torch.Tensor | None = None   # (T, routed streams) bool, every token (eager only)


# Several short multi-token rows (prefix-cache hits, routed tokens of chunks) share one
# attention call, padded to the longest row, when that at most doubles the queries: a call
# costs about 15 operators, which is most of a short row's attention. Long rows gain nothing
# from it (measured: 4 rows of 12 tokens 1.1-1.4x faster, 8 of 48 and 2 of 256 a little
# slower), so they keep one call each.
PAD_MAX_QUERIES = 32


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """One host-to-device copy of an int64 vector (pinned and asynchronous on CUDA)."""
    t = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def padded_tables(kvs: list[SequenceKV], width: int) -> list[int]:
    """Every row's block table of every stream, padded with block 0 to ``width``, flat."""
    return [b for kv in kvs for t in kv.block_tables for b in t + [0] * (width - len(t))]


def any_routable(scheduled: list[ScheduledSeq]) -> bool:
    """Whether any row can take a routed step (θ = +inf, budget 0, never routes)."""
    return any(s.seq.routable for s in scheduled)


def join_outputs(first: StepOutput, rest: StepOutput) -> StepOutput:
    """One step's output from two parts run apart, rows of ``first`` before those of
    ``rest``. A part without per-token routing computed one token per row, so its routed
    counts are that routing."""
    routed = None
    if first.routed is not None or rest.routed is not None:
        routed = torch.cat([part.routed_counts.bool() if part.routed is None else part.routed
                            for part in (first, rest)])
    return StepOutput(torch.cat([first.logits, rest.logits]),
                      torch.cat([first.routed_counts, rest.routed_counts]),
                      torch.cat([first.extra_steps, rest.extra_steps]), routed)


class PagedForward:
    def __init__(self, model: ITTModel, cache: KVCache) -> None:
        self.model = model
        self.cfg: ModelConfig = model.cfg
        self.cache = cache
        self.device = next(model.parameters()).device

    # ---- host side ------------------------------------------------------------------------
    def prepare(self, scheduled: list[ScheduledSeq], kvs: list[SequenceKV],
                logit_positions: list[list[int]], masked_routing: bool = False) -> StepBatch:
        """``scheduled`` must list single-token sequences first; ``kvs`` are their KV streams.
        ``logit_positions[b]`` are the indices within row b's new tokens whose logits the
        caller needs."""
        ids: list[int] = []
        pos: list[int] = []
        rows: list[int] = []
        row_start: list[int] = []
        logit_rows: list[int] = []
        num_decode = 0
        for b, s in enumerate(scheduled):
            c, n = s.seq.num_computed_tokens, s.num_new_tokens
            if n == 1 and num_decode == b:
                num_decode += 1
            base = len(ids)
            row_start.append(base)
            ids.extend(s.input_ids)
            pos.extend(range(c, c + n))
            rows.extend([b] * n)
            logit_rows.extend(base + i for i in logit_positions[b])
        row_blocks = [[len(t) for t in kv.block_tables] for kv in kvs]
        stream_blocks = [max(col) for col in zip(*row_blocks)]
        width = max(stream_blocks)
        tables = padded_tables(kvs, width)
        lengths = [n for kv in kvs for n in kv.lengths]
        B, T, S, N = len(scheduled), len(ids), len(logit_rows), self.cfg.num_kv_streams
        flat = to_device(ids + pos + rows + row_start + logit_rows + tables + lengths,
                         self.device)
        ids_t, pos_t, rows_t, start_t, logit_t, tables_t, lengths_t = flat.split(
            [T, T, T, B, S, B * N * width, B * N])
        thresholds = torch.tensor([s.seq.thresholds for s in scheduled], dtype=torch.float32)
        token_thresholds = self._token_thresholds(scheduled)
        return StepBatch(
            input_ids=ids_t, positions=pos_t, tok_seq=rows_t, row_start=start_t,
            block_tables=tables_t.view(B, N, width), stream_lengths=lengths_t.view(B, N),
            thresholds=thresholds.view(B, -1).to(self.device, non_blocking=True),
            logit_rows=logit_t, num_decode=num_decode,
            chunk_lens=[s.num_new_tokens for s in scheduled[num_decode:]],
            stream_blocks=stream_blocks, row_blocks=row_blocks, masked_routing=masked_routing,
            routable=any_routable(scheduled) or token_thresholds is not None,
            token_thresholds=None if token_thresholds is None
            else token_thresholds.to(self.device, non_blocking=True))

    def _token_thresholds(self, scheduled: list[ScheduledSeq]) -> torch.Tensor | None:
        """Per-token thresholds if some row recomputes positions that were first computed at
        a budget other than its current one (they must route exactly as they did)."""
        def recorded(s: ScheduledSeq) -> list[float]:
            c = s.seq.num_computed_tokens
            return s.seq.position_budgets[c:c + s.num_new_tokens]
        if not any(b != s.seq.think_budget for s in scheduled for b in recorded(s)):
            return None
        by_budget: dict[float, list[float]] = {}
        rows = []
        for s in scheduled:
            budgets = recorded(s)
            budgets += [s.seq.think_budget] * (s.num_new_tokens - len(budgets))
            for b in budgets:
                if b not in by_budget:
                    by_budget[b] = self.cfg.thresholds_for(b)
                rows.append(by_budget[b])
        return torch.tensor(rows, dtype=torch.float32).view(len(rows), -1)

    # ---- device side ----------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: StepBatch) -> StepOutput:
        cfg, model, bs = self.cfg, self.model, self.cache.block_size
        x = model.embed_tokens(batch.input_ids)                          # (T, d)
        cos, sin = model.rotary(batch.positions, x.dtype)                # (T, 1, D)
        T = x.shape[0]
        B = batch.block_tables.shape[0]
        # Base streams hold every token at its position: their slots for all layers at once.
        pos_blk = torch.div(batch.positions, bs, rounding_mode="floor")
        base_slots = batch.block_tables[batch.tok_seq, :cfg.n_layers, :].gather(
            2, pos_blk[:, None, None].expand(T, cfg.n_layers, 1))[..., 0] * bs \
            + (batch.positions % bs)[:, None]                            # (T, n_layers)
        routed_counts = torch.zeros(B, cfg.max_extra_steps, dtype=torch.long, device=x.device)
        routed_all = torch.zeros(T, cfg.max_extra_steps, dtype=torch.bool, device=x.device)
        thresholds_tok = (batch.thresholds[batch.tok_seq] if batch.token_thresholds is None
                          else batch.token_thresholds)                   # (T, routed streams)
        routed_step = self._masked_step if batch.masked_routing else self._gathered_step
        itt_index = 0
        for layer_idx, layer in enumerate(model.itt_layer_list):
            rows = StreamRows(layer_idx, batch.tok_seq, batch.positions,
                              base_slots[:, layer_idx], batch.num_decode, batch.chunk_lens)
            x = layer.base_update(x, self._block(layer.block, x, cos, sin, rows, batch))
            if layer.think_steps == 1:
                continue
            for t in range(1, layer.think_steps if batch.routable else 1):
                k = itt_index * cfg.n_routed_steps + (t - 1)
                logits_r = layer.router_logits(t, x)                     # (T,)
                routed = logits_r.float() > thresholds_tok[:, k]         # (T,) bool
                x, counts = routed_step(layer, t, cfg.n_layers + k, x, cos, sin, logits_r,
                                        routed, batch)
                routed_counts[:, k] = counts
                routed_all[:, k] = routed
            itt_index += 1
        h = x[batch.logit_rows]
        extra_steps = routed_all[batch.logit_rows].sum(1)               # (S,) routed steps
        return StepOutput(model.output_logits(h), routed_counts, extra_steps, routed_all)

    def _gathered_step(self, layer, t: int, stream: int, x, cos, sin, logits_r, routed,
                       batch: StepBatch):
        """Routed step on exactly the routed tokens. Returns (new x, routed count per row)."""
        B = batch.block_tables.shape[0]
        idx = routed.nonzero().squeeze(1)                                # (R,) host sync
        if idx.numel() == 0:
            return x, torch.zeros(B, dtype=torch.long, device=x.device)
        seq_of = batch.tok_seq[idx]
        counts = torch.bincount(seq_of, minlength=B)                     # (B,)
        # Stream position: stored tokens + rank among this step's routed tokens.
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(idx.numel(), device=x.device) - starts[seq_of]
        spos = batch.stream_lengths[seq_of, stream] + rank
        nd = batch.num_decode
        if batch.chunk_lens:      # mixed batch: how many routed tokens per chunk
            n_dec, chunk_counts = int((idx < nd).sum()), counts[nd:].tolist()
        else:                     # decode only: no further host sync
            n_dec, chunk_counts = idx.numel(), []
        rows = StreamRows(stream, seq_of, spos, self._slots(batch, seq_of, stream, spos), n_dec,
                          chunk_counts)
        delta = self._block(layer.block, x[idx], cos[idx], sin[idx], rows, batch)
        return x.index_add(0, idx, layer.routed_increment(t, torch.sigmoid(logits_r[idx]),
                                                          delta)), counts

    def _masked_step(self, layer, t: int, stream: int, x, cos, sin, logits_r, routed,
                     batch: StepBatch):
        """Routed step on every token, keeping routed results only; no host sync."""
        B = batch.block_tables.shape[0]
        r = routed.long()
        counts = torch.zeros(B, dtype=torch.long, device=x.device).index_add_(
            0, batch.tok_seq, r)
        # Rank among the routed tokens of the same row (a row's tokens are contiguous).
        before = torch.cumsum(r, 0) - r
        rank = before - before[batch.row_start][batch.tok_seq]
        spos = batch.stream_lengths[batch.tok_seq, stream] + rank
        slots = torch.where(routed, self._slots(batch, batch.tok_seq, stream, spos),
                            self.cache.scratch_slot)
        rows = StreamRows(stream, batch.tok_seq, spos, slots, batch.num_decode, batch.chunk_lens)
        delta = self._block(layer.block, x, cos, sin, rows, batch)
        routed_x = x + layer.routed_increment(t, torch.sigmoid(logits_r), delta)
        return torch.where(routed[:, None], routed_x, x), counts

    def _slots(self, batch: StepBatch, rows, stream: int, spos) -> torch.Tensor:
        """Flat cache slots of stream positions ``spos`` in ``stream`` of batch ``rows``."""
        bs = self.cache.block_size
        blk = batch.block_tables[rows, stream, torch.div(spos, bs, rounding_mode="floor")]
        return blk * bs + spos % bs

    def _block(self, block, x, cos, sin, rows: StreamRows, batch: StepBatch) -> torch.Tensor:
        """Δ for tokens x (N, d), laid out as ``rows`` describes; writes their K/V."""
        q, k, v = block.project_qkv(x, cos, sin)                         # (N, H|KV, D)
        self.cache.write(rows.slots, k, v)
        stream, spos, n_dec = rows.stream, rows.positions, rows.num_decode
        parts = []
        if n_dec:                     # single-token rows: one batched call
            table = batch.block_tables[rows.rows[:n_dec], stream, :batch.stream_blocks[stream]]
            parts.append(self.cache.attend(q[:n_dec, None], spos[:n_dec, None], table)[:, 0])
        chunks = [(batch.num_decode + j, n) for j, n in enumerate(rows.chunk_lens) if n]
        queries = sum(n for _, n in chunks)
        longest = max((n for _, n in chunks), default=0)
        if len(chunks) > 1 and longest <= PAD_MAX_QUERIES and len(chunks) * longest <= 2 * queries:
            parts.append(self._attend_padded(q[n_dec:], spos[n_dec:], chunks, stream, batch))
        else:                         # one call per multi-token row
            start = n_dec
            for row, n in chunks:
                table = batch.block_tables[row:row + 1, stream, :batch.row_blocks[row][stream]]
                sl = slice(start, start + n)
                parts.append(self.cache.attend(q[None, sl], spos[None, sl], table)[0])
                start += n
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return block.finish(x, out.flatten(-2))

    def _attend_padded(self, q, spos, chunks: list[tuple[int, int]], stream: int,
                       batch: StepBatch) -> torch.Tensor:
        """Attention of several multi-token rows in one call: q (N, H, D) and spos (N,) are
        the rows' queries back to back, ``chunks`` (batch row, query count) per row. Each row
        is padded to the longest by repeating its last query (same position, so the padding
        is a valid query whose output is dropped); tables are cut at the widest row (a
        narrower row's padding blocks lie past its positions, so the mask hides them)."""
        C, Q = len(chunks), max(n for _, n in chunks)
        padded: list[int] = []
        real: list[int] = []
        start = 0
        for c, (_, n) in enumerate(chunks):
            padded += [*range(start, start + n), *[start + n - 1] * (Q - n)]
            real += range(c * Q, c * Q + n)
            start += n
        index = to_device(padded + real + [row for row, _ in chunks], q.device)
        padded_t, real_t, rows_t = index.split([C * Q, start, C])
        width = max(batch.row_blocks[row][stream] for row, _ in chunks)
        table = batch.block_tables[rows_t, stream, :width]
        o = self.cache.attend(q[padded_t].view(C, Q, *q.shape[1:]), spos[padded_t].view(C, Q),
                              table)
        return o.flatten(0, 1)[real_t]
