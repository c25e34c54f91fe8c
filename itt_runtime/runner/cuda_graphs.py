"""Decode steps replayed from CUDA graphs.

A small model's decode step is a few hundred tiny kernels; launching them one by one from
Python costs more than running them. As in vLLM, a decode-only step is captured once per
padded shape and then replayed with one call.

Capturing needs a step whose shapes and control flow do not depend on data. A decode-only
step with masked routed steps (see forward.py) is such a step once its batch is padded:

  * rows are padded up to a batch bucket (1, 2, 4, 8, 16, 24, 32, 40, 48, …). A padding row
    reads token 0 at position 0 through a block table made only of the cache's scratch block,
    and its thresholds are +inf: it is never routed, writes only to scratch, and its outputs
    are dropped;
  * block tables are padded up to a width bucket (powers of two up to the longest sequence),
    the width of every attention gather in the step.

A batch where every row has budget 0 skips the routed steps (the host knows that from the
thresholds, +inf at b = 0), so it has graphs of its own: one graph per (batch bucket, width
bucket, any row routable), captured the first time that shape is needed,
all sharing one memory pool. Inputs are copied into the graph's static buffers with one
host-to-device copy before each replay. With ``capture=False`` the same padded step runs
eagerly: that is how the CPU tests check the padding against the reference model.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from dataclasses import dataclass

import torch

from itt_runtime.engine.step import ScheduledSeq
from itt_runtime.kv_cache.manager import SequenceKV
from itt_runtime.runner.forward import (
    PagedForward,
    StepBatch,
    StepOutput,
    any_routable,
    padded_tables,
    to_device,
)

log = logging.getLogger("itt_runtime")


class CaptureError(RuntimeError):
    """Capturing a decode step failed; nothing of the step was computed or written."""


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to 64, of 16 up to 128, … (at most a quarter of the
    size is padding), ending at ``max_batch``."""
    out, n = [], 1
    while n < max_batch:
        out.append(n)
        n = n * 2 if n < 8 else n + max(8, 2 ** (n.bit_length() - 3))
    return out + [max_batch]


def width_buckets(max_blocks: int) -> list[int]:
    """Powers of two below ``max_blocks``, then ``max_blocks``."""
    return [2 ** i for i in range(max(0, math.ceil(math.log2(max_blocks))))
            if 2 ** i < max_blocks] + [max_blocks]


def round_up(n: int, buckets: list[int]) -> int:
    return buckets[bisect.bisect_left(buckets, n)]


@dataclass
class _Graph:
    batch: StepBatch                 # static buffers the graph reads
    flat: torch.Tensor               # ids | positions | block tables | lengths, one buffer
    output: StepOutput | None = None
    graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    def __init__(self, forward: PagedForward, max_batch: int, max_blocks: int,
                 capture: bool = True) -> None:
        self.forward = forward
        self.capture = capture
        self.batch_buckets = batch_buckets(max_batch)
        self.width_buckets = width_buckets(max_blocks)
        self.graphs: dict[tuple[int, int, bool], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        cfg = forward.cfg
        self.num_streams, self.num_routed = cfg.num_kv_streams, cfg.max_extra_steps

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.batch_buckets[-1]

    def run(self, scheduled: list[ScheduledSeq], kvs: list[SequenceKV]) -> StepOutput:
        """One decode step: every scheduled sequence computes one token and samples.
        Raises CaptureError, before any of the step's K/V is written, if a capture fails."""
        B = len(scheduled)
        width = max(len(t) for kv in kvs for t in kv.block_tables)
        g = self._graph(round_up(B, self.batch_buckets), round_up(width, self.width_buckets),
                        any_routable(scheduled))
        Bp, N, W = g.batch.block_tables.shape
        pad_rows = Bp - B
        scratch = self.forward.cache.scratch_block
        ids = [s.seq.all_token_ids[s.seq.num_computed_tokens] for s in scheduled]
        pos = [s.seq.num_computed_tokens for s in scheduled]
        tables = padded_tables(kvs, W)
        lengths = [n for kv in kvs for n in kv.lengths]
        g.flat.copy_(to_device(ids + [0] * pad_rows + pos + [0] * pad_rows
                               + tables + [scratch] * (pad_rows * N * W)
                               + lengths + [0] * (pad_rows * N), self.forward.device),
                     non_blocking=True)
        thresholds = [t for s in scheduled for t in s.seq.thresholds]
        thresholds += [math.inf] * (pad_rows * self.num_routed)
        g.batch.thresholds.copy_(torch.tensor(thresholds).view(Bp, self.num_routed),
                                 non_blocking=True)
        if g.graph is not None:
            g.graph.replay()
        else:
            g.output = self.forward.execute(g.batch)
        out = g.output
        assert out is not None
        return StepOutput(out.logits[:B], out.routed_counts[:B], out.extra_steps[:B])

    def _graph(self, Bp: int, W: int, routable: bool) -> _Graph:
        g = self.graphs.get((Bp, W, routable))
        if g is None:
            g = self.graphs[(Bp, W, routable)] = self._build(Bp, W, routable)
        return g

    def _build(self, Bp: int, W: int, routable: bool) -> _Graph:
        dev, N = self.forward.device, self.num_streams
        flat = torch.zeros(2 * Bp + Bp * N * W + Bp * N, dtype=torch.long, device=dev)
        ids, pos, tables, lengths = flat.split([Bp, Bp, Bp * N * W, Bp * N])
        rows = torch.arange(Bp, device=dev)
        batch = StepBatch(
            input_ids=ids, positions=pos, tok_seq=rows, row_start=rows,
            block_tables=tables.view(Bp, N, W), stream_lengths=lengths.view(Bp, N),
            thresholds=torch.full((Bp, self.num_routed), math.inf, device=dev),
            logit_rows=rows, num_decode=Bp, chunk_lens=[], stream_blocks=[W] * N,
            row_blocks=[], masked_routing=True, routable=routable)
        g = _Graph(batch, flat)
        if self.capture:
            # Until the first real copy every row is a padding row: writes go to scratch.
            tables.fill_(self.forward.cache.scratch_block)
            start = time.perf_counter()
            try:
                self._capture(g)
            except RuntimeError as e:
                raise CaptureError(f"capturing a decode step of {Bp} rows, {W} blocks wide, "
                                   f"failed: {e}") from e
            log.info("captured a CUDA graph for decode steps of %d rows, %d blocks wide%s "
                     "in %.0f ms", Bp, W, "" if routable else " (budget 0)",
                     (time.perf_counter() - start) * 1e3)
        return g

    def _capture(self, g: _Graph) -> None:
        with torch.cuda.device(self.forward.device):        # streams of the model's GPU
            # Warm up on a side stream first (lazy cuBLAS / attention-kernel initialisation
            # must not happen inside the capture), as the torch.cuda.graphs docs advise.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.forward.execute(g.batch)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                g.output = self.forward.execute(g.batch)
        g.graph = graph
