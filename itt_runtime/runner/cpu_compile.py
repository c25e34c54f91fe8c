"""Compiled steps on CPU: the variants, which steps use them, and torch.compile in-process.

On CPU a small model's decode step is a few hundred small operators, and running them one by
one from Python costs more than their arithmetic (docs/perf-notes.md). As CUDA graphs do on a
GPU (cuda_graphs.py), a step is compiled once per variant and then run as one call; inductor
fuses the elementwise work (norms, RoPE, softmax, SiLU, residuals) into a few C++ loops
around the matmuls. A server compiles the variants ahead of time in a child process and keeps
them on disk (aot_compile.py, ``compile_ahead``); an offline engine with ``compile="on"``
compiles them here with ``torch.compile`` when a step first needs one.

What is compiled is ``rows_step`` (decode_step.py), a pure function of token rows (decode
rows and prompt or verify chunks alike): the new K/V come back as outputs and are written to
the cache here, after the call, with one ``index_copy_`` per cache tensor. So a failure
inside the compiled call (a compile error, an unsupported operator) leaves the cache
untouched, and the step can be rerun eagerly.

Shapes: one compiled variant per "any row routable" (a batch at budget 0 skips the routed
steps, so it is a different graph) and per "one decode row or several rows", compiled with
dynamic shapes: the rows, logit rows and block-table width of a step of several rows are
symbols, so a server compiles at most four times, whatever its load (a variant per padded
shape, as the CUDA graphs have, cost 40-130 s of compilation each on a busy 2-core machine,
and a growing context would keep hitting new widths). A symbolic size is never 0 or 1 (the
compiler specialises those), so tables are padded to a width of at least 2, and a single
decode row has its own variant with everything fixed at 1 rather than a padding row: on CPU
a matmul of two rows costs about twice one row's (this machine's sgemm is compute-bound even
there), which made a padded single-stream step 1.4x slower. The in-process compile time is
logged, and bounded: once compiles have taken ``compile_budget_s`` in all, variants not
compiled yet run eagerly.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from itt_runtime.engine.step import ScheduledSeq
from itt_runtime.kv_cache.manager import SequenceKV
from itt_runtime.model import packed_linear
from itt_runtime.runner import aot_compile
from itt_runtime.runner.aot_compile import cache_dir
from itt_runtime.runner.decode_step import rows_step, write_new_kv
from itt_runtime.runner.forward import PagedForward, StepOutput, any_routable, join_outputs

log = logging.getLogger("itt_runtime")

# Inductor options (torch._inductor.config names) for the decode step. ``freezing`` makes
# the weights constants (folded into the graph once). ``cpp.threads`` 1: the fused loops of
# a one-row step are a few thousand elements, less work than an OpenMP fork/join, which on
# shared cores spin-waits; the matmuls (aten) still use torch's intra-op threads. Steps of
# several rows run their loops on every intra-op thread (aot_compile.package_options).
# ``cpp.weight_prepack`` off: frozen fp32 weights would be repacked for MKL's packed sgemm,
# which on this project's shapes is slower than a plain matmul on the input-major weights
# the loader stores on CPU (layers.input_major_view): a one-row step took 1.13x longer.
INDUCTOR_OPTIONS: dict[str, Any] = {"freezing": True, "cpp.threads": 1,
                                    "cpp.weight_prepack": False}
# The one-row variant also gets inductor's C++ wrapper: the step is then one C++ call that
# holds no GIL, instead of Python code calling each kernel (the GIL held for the fused
# kernels), so the server's event loop streams tokens while the next step runs. Through
# HTTP at one stream 1.11x the tokens/s; for several rows it measured 0.97-1.01x (the
# step is longer, the wrapper's share smaller), so they keep the Python wrapper.
ONE_ROW_OPTIONS: dict[str, Any] = {"cpp_wrapper": True}


class CompileError(RuntimeError):
    """Compiling or running a compiled decode step failed. Rerunning the step eagerly is
    safe: it writes every K/V slot the failed step may have written."""


Key = tuple[int, int, bool]          # (padded rows, padded width, any row routable)
Variant = tuple[bool, bool]          # (one row, any row routable): one compile each
MIN_SIZE = 2                         # pad batches of several rows and widths to this
# Steps of more token rows run eagerly: the step's own keys are a rows × rows block per head
# (a decode step's diagonal, a chunk's causal triangle), which past a few hundred rows costs
# more than the eager path's per-chunk attention.
MAX_STEP_ROWS = 256
# Rows at budget 0 run as a step of their own once there are this many: a routed row at
# batch 32 costs about 0.6 ms more than one at budget 0, a second call about 2 ms.
SPLIT_MIN_ROWS = 4


# Every variant, in the order a background compile makes them: one row and several that can
# route first (requests at the default budget), then budget 0.
VARIANTS: tuple[Variant, ...] = ((True, True), (False, True), (True, False), (False, False))


def variant_of(key: Key) -> Variant:
    return key[0] == 1, key[2]


def describe(variant: Variant) -> str:
    return ("one row" if variant[0] else "several rows") + ("" if variant[1] else ", budget 0")


def own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own. Dynamo keeps compiled code per code object, at
    most ``recompile_limit`` (8) entries each, and every closure made by one ``def`` shares
    that def's code object: without a copy, the variants of every engine in a process would
    fill one code object's entries (two engines of four variants and one recompile fail)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                              fn.__defaults__, fn.__closure__)


class CompiledDecode:
    """Runs steps through compiled ``rows_step`` variants.

    ``compile=False`` runs the same padded pure step eagerly (the tests compare both);
    ``backend`` another torch.compile backend (the fast tests trace with ``aot_eager``).
    ``lazy``: a step whose variant is not compiled yet compiles it (and waits); without, such
    steps are not this class's (``ready_for``) until ``compile_in_background`` made it."""

    def __init__(self, forward: PagedForward, max_batch: int,
                 compile: bool = True, compile_budget_s: float = 600.0,
                 options: dict[str, Any] | None = None, backend: str = "inductor",
                 lazy: bool = True) -> None:
        self.forward = forward
        self.model = forward.model
        self.cache = forward.cache
        self.max_batch = max_batch
        self.compile = compile
        self.compile_budget_s = compile_budget_s
        self.compile_seconds = 0.0              # spent so far, all variants together
        self.options = dict(INDUCTOR_OPTIONS if options is None else options)
        self.backend = backend                  # another torch.compile backend: tests
        self.lazy = lazy
        self.variants: dict[Variant, Callable] = {}
        self.eager_keys: set[Variant] = set()   # over the budget: these run eagerly
        self.ready_seconds: dict[Variant, float] = {}    # compile time of each variant made
        self.failed: set[Variant] = set()       # background compiles that failed: eager
        self.packed_bytes: int | None = None    # weights packed for oneDNN (_pack_weights)
        cfg = self.model.cfg
        self.n_layers, self.num_routed = cfg.n_layers, cfg.max_extra_steps
        cache_dir()                             # pinned before anything compiles

    def can_run(self, scheduled: list[ScheduledSeq]) -> bool:
        """Whether a step of these rows fits a compiled step: at most ``max_batch``
        sequences and ``MAX_STEP_ROWS`` tokens (the step's own keys are a rows × rows block
        per head, which past a few hundred rows costs more than the eager chunked path)."""
        return len(scheduled) <= self.max_batch \
            and sum(s.num_new_tokens for s in scheduled) <= MAX_STEP_ROWS

    def ready_for(self, scheduled: list[ScheduledSeq]) -> bool:
        """Whether ``run`` would use only compiled variants (always, when lazy: it compiles
        what is missing)."""
        return self.lazy or all(v in self.variants for v in self._variants(scheduled))

    def _split(self, scheduled: list[ScheduledSeq]) -> int:
        """How many leading rows (those that route) run as a step of their own, apart from
        the budget-0 rows after them; 0 for one step. Decode-only steps only."""
        if any(s.num_new_tokens != 1 for s in scheduled):
            return 0
        flags = [s.seq.routable for s in scheduled]
        n = sum(flags)
        return n if n and len(scheduled) - n >= SPLIT_MIN_ROWS and all(flags[:n]) else 0

    def _variants(self, scheduled: list[ScheduledSeq]) -> list[Variant]:
        n = self._split(scheduled)
        parts = [scheduled[:n], scheduled[n:]] if n else [scheduled]
        return [(self._one_row(p), any_routable(p)) for p in parts]

    @staticmethod
    def _one_row(scheduled: list[ScheduledSeq]) -> bool:
        return len(scheduled) == 1 and scheduled[0].num_new_tokens == 1 \
            and scheduled[0].logit_positions == [0]

    def run(self, scheduled: list[ScheduledSeq], kvs: list[SequenceKV]) -> StepOutput:
        """One step of token rows: decode rows (one token each) and prompt or verify chunks,
        single-token rows first. Raises CompileError if a compiled step fails; the step can
        then be rerun eagerly (what was written, the K/V of rows before a split, the rerun
        writes again).

        Rows that can route come first (ModelRunner orders them so). When at least
        ``SPLIT_MIN_ROWS`` decode rows cannot route (budget 0: under elastic thinking, the
        rows floored beside a prompt, or requests that ask for 0), they run as a step of
        their own through the budget-0 variant: the masked routed steps of the other variant
        would otherwise cost them as much as a row at budget 1."""
        n = self._split(scheduled)
        if n:
            return join_outputs(self._run(scheduled[:n], kvs[:n]),
                                self._run(scheduled[n:], kvs[n:]))
        return self._run(scheduled, kvs)

    def greedy_drafts(self, rows: list[ScheduledSeq], kvs: list[SequenceKV],
                      steps: int) -> list[list[int]]:
        """``steps`` greedy decode steps of one-token rows that cannot route (drafts at
        budget 0, runner/speculative.py), each step's argmax fed to the next on the device:
        the step's inputs are built once and moved on by a position per step, and the tokens
        are read to the host once at the end. Returns each row's tokens.

        The same compiled calls on the same inputs as ``steps`` calls of ``run`` with the
        rows moved on by their drafts (so the same tokens and K/V), without rebuilding the
        inputs from Python lists every step and reading each step's tokens back: at one
        stream that host work was about a fifth of a draft step."""
        assert not any_routable(rows) and all(s.num_new_tokens == 1 for s in rows)
        key, args, _ = self._inputs(rows, kvs, False, None,
                                    1 if self._one_row(rows) else MIN_SIZE)
        ids, pos, lengths = args[2], args[3], args[6]
        n = len(rows)
        tokens: list[torch.Tensor] = []
        with torch.inference_mode():
            for i in range(steps):
                if i:
                    ids[:n] = tokens[-1]
                    pos[:n] += 1
                    lengths[:n] += 1            # every base stream holds one more position
                logits, _, new_k, new_v, slots = self._call(key, args)
                write_new_kv(self.cache.k, self.cache.v, new_k, new_v, slots)
                tokens.append(logits[:n].argmax(-1))
            return torch.stack(tokens, 1).tolist()

    def warm_up(self) -> None:
        """Compile every variant now, not in the first step that needs it: a compile takes
        15-160 s on a busy 2-core machine, which the first requests of each kind would
        otherwise wait (``--compile on`` calls this before the server listens). Raises
        CompileError as a step would."""
        for variant in VARIANTS:
            if variant not in self.variants:
                self.compile_variant(variant)

    def status(self) -> dict[str, tuple[str, float | None]]:
        """Each needed variant by name (aot_compile.variant_name): "ready" (with the seconds
        after start-up it became ready), "failed" (runs eagerly) or "compiling" (eager until
        ready; also before any compile was asked for)."""
        out: dict[str, tuple[str, float | None]] = {}
        for v in self.needed_variants():
            state = ("ready" if v in self.variants
                     else "failed" if v in self.failed or v in self.eager_keys else "compiling")
            out[aot_compile.variant_name(v)] = (state, self.ready_seconds.get(v))
        return out

    def needed_variants(self) -> list[Variant]:
        """The variants steps can ask for: a dense model never routes."""
        return [v for v in VARIANTS if v[1] is False or self.num_routed > 0]

    def compile_ahead(self, source: tuple[Path, torch.dtype, str], wait: bool = False,
                      variants: list[Variant] | None = None) -> threading.Thread | None:
        """Ahead-of-time compiled variants (aot_compile.py): those in the compile cache are
        loaded now (a second each); the others are compiled by a child process at the lowest
        CPU priority, on a thread of its own that loads each as it is finished, used from
        the next step on (``ready_for``). ``source``: the checkpoint path, dtype and
        quantization mode, which the child loads as the engine did. ``wait``: return when all
        are ready (``--compile on``). A variant that fails to compile or load runs eagerly,
        logged. ``variants``: only these (tests)."""
        self.lazy = False
        start = time.perf_counter()
        threads = torch.get_num_threads()         # baked into the packages' fused loops
        wanted = self.needed_variants() if variants is None else variants
        # Each package's path once (its signature hashes the model's layout and sources).
        package = {v: aot_compile.package_path(self.model, self.cache.k, v, threads)
                   for v in {*self.needed_variants(), *wanted}}
        jobs: list[tuple[Variant, Path]] = []
        for variant in wanted:
            if variant in self.variants:
                continue
            path = package[variant]
            if path.exists() and self._use_package(variant, path, start, "loaded from the "
                                                   "compile cache"):
                continue
            jobs.append((variant, path))
        for path in aot_compile.prune(set(package.values())):
            log.info("deleted the compiled step %s (unused for %d days)", path.name,
                     aot_compile.PRUNE_AFTER_DAYS)
        if not jobs:
            return None
        command = aot_compile.child_command(source[0], source[1], self.cache.block_size,
                                            threads, jobs, quantization=source[2])
        paths = dict(jobs)

        def compile_all() -> None:
            log.info("compiling %d decode-step variants in a background process (%s); steps "
                     "run eagerly until each is ready", len(jobs),
                     ", ".join(describe(v) for v, _ in jobs))
            for status, variant, seconds, error in aot_compile.run_child(command, list(paths)):
                self.compile_seconds += seconds
                if status == "ready" and self._use_package(
                        variant, paths[variant], start, f"compiled in {seconds:.1f} s"):
                    continue
                self.failed.add(variant)
                log.warning("compiling the decode step (%s) failed; those steps run eagerly: "
                            "%s", describe(variant), error or "its package did not load")

        thread = threading.Thread(target=compile_all, name="itt-compile", daemon=True)
        thread.start()
        if wait:
            thread.join()
        return thread

    def _use_package(self, variant: Variant, path: Path, start: float, how: str) -> bool:
        """Load one variant's package and use it from the next step; False if it fails."""
        try:
            fn = aot_compile.load_package(self.model, path)
        except Exception:
            log.warning("the compiled decode step %s did not load (deleted)", path,
                        exc_info=True)
            path.unlink(missing_ok=True)
            return False
        if aot_compile.packed_step(self.model, variant[0]):
            self._pack_weights()
        self.variants[variant] = fn
        self.ready_seconds[variant] = time.perf_counter() - start
        log.info("decode step (%s) ready %.1f s after start-up (%s)", describe(variant),
                 self.ready_seconds[variant], how)
        return True

    def _pack_weights(self) -> None:
        """Before the first variant that calls packed_linear is used
        (aot_compile.packed_step): the packed weights its matmuls run on
        (model/packed_linear.py; fp32 only), once. Not earlier, so that an engine that never
        runs such a step holds no second copy."""
        if self.packed_bytes is not None:
            return
        self.packed_bytes = 0
        if self.model.head is not None:          # quantized: its matmuls are fbgemm's
            return
        if self.model.embed_tokens.weight.dtype != torch.float32:
            return
        try:
            self.packed_bytes = packed_linear.pack_model(self.model)
        except RuntimeError:            # a oneDNN build that cannot: the plain weights serve
            log.warning("packing weights for oneDNN failed; compiled steps use the plain "
                        "weights", exc_info=True)
        if self.packed_bytes:
            log.info("packed %.1f MiB of weights for oneDNN and the few-rows kernel "
                     "(compiled steps)", self.packed_bytes / 2**20)

    def compile_in_background(self) -> threading.Thread:
        """Compile every variant on a thread of its own while steps run (``--compile auto``):
        each is used from the first step after it is ready (``ready_for``); until then, and
        for good if its compile fails (logged), the runner runs those steps eagerly. No step
        waits for a compile, but every step is slower meanwhile: tracing holds the GIL that
        each eager operator needs (docs/perf-notes.md, 2026-12-06)."""
        self.lazy = False

        def compile_all() -> None:
            for variant in VARIANTS:
                if variant in self.variants:
                    continue
                try:
                    self.compile_variant(variant)
                except CompileError:
                    self.failed.add(variant)
                    log.warning("compiling the decode step (%s) failed; those steps run "
                                "eagerly", describe(variant), exc_info=True)

        thread = threading.Thread(target=compile_all, name="itt-compile", daemon=True)
        thread.start()
        return thread

    def compile_variant(self, variant: Variant) -> None:
        """Compile one variant by running it once on a step of padding rows over the scratch
        block; its outputs are dropped, so the cache is untouched."""
        start = time.perf_counter()
        key, args = self.example(variant)
        with torch.inference_mode():
            self._compile_and_call(key, args)
        log.info("decode step (%s) compiled and ready in %.1f s", describe(variant),
                 time.perf_counter() - start)

    def example(self, variant: Variant) -> tuple[Key, tuple]:
        """A step of padding rows only (one, or two) for ``variant``."""
        one_row, routable = variant
        key, args, _ = self._inputs([], [], routable, None, 1 if one_row else MIN_SIZE)
        return key, args

    def _inputs(self, scheduled: list[ScheduledSeq], kvs: list[SequenceKV], routable: bool,
                per_token: torch.Tensor | None, min_rows: int
                ) -> tuple[Key, tuple, torch.Tensor]:
        """The key, the compiled step's arguments and each row's sequence: every scheduled
        sequence's new tokens as rows, padded to at least ``min_rows`` rows (of a padding
        sequence of their own) and logit rows (the last one repeated); 1 for the one-row
        variant. Each row carries its sequence's block tables and stream lengths (rows_step
        reads them per row). ``per_token``: ``PagedForward._token_thresholds``."""
        streams = len(kvs[0].block_tables) if kvs and routable else \
            (self.model.cfg.num_kv_streams if routable else self.n_layers)
        scratch = self.cache.scratch_block
        ids: list[int] = []
        pos: list[int] = []
        seq: list[int] = []
        first: list[int] = []
        logit_rows: list[int] = []
        for g, s in enumerate(scheduled):
            c, n, start = s.seq.num_computed_tokens, s.num_new_tokens, len(ids)
            ids += s.input_ids
            pos += range(c, c + n)
            seq += [g] * n
            first += [start] * n
            logit_rows += [start + i for i in s.logit_positions]
        G = len(scheduled) + (len(ids) < min_rows)              # + a padding sequence
        for _ in range(min_rows - len(ids)):                    # padding rows
            first.append(len(ids))
            ids.append(0)
            pos.append(0)
            seq.append(G - 1)
        logit_rows += logit_rows[-1:] * (min_rows - len(logit_rows)) if logit_rows \
            else [0] * min_rows
        W = max([len(t) for kv in kvs for t in kv.block_tables[:streams]] + [MIN_SIZE])
        padding = G - len(scheduled)
        tables = [b for kv in kvs for t in kv.block_tables[:streams]
                  for b in t + [scratch] * (W - len(t))] + [scratch] * (streams * W * padding)
        lengths = [n for kv in kvs for n in kv.lengths[:streams]] + [0] * (streams * padding)
        B, S = len(ids), len(logit_rows)
        flat = torch.tensor(ids + pos + seq + first + tables + lengths + logit_rows,
                            dtype=torch.long)
        ids_t, pos_t, seq_t, first_t, tables_t, lengths_t, logit_t = flat.split(
            [B, B, B, B, G * streams * W, G * streams, S])
        thresholds = self._thresholds(scheduled, routable, per_token, B)
        tables_g, lengths_g = tables_t.view(G, streams, W), lengths_t.view(G, streams)
        if B != G:                      # several rows of one sequence: its tables per row
            tables_g, lengths_g = tables_g[seq_t], lengths_g[seq_t]
        args = (self.cache.k, self.cache.v, ids_t, pos_t, first_t, tables_g, lengths_g,
                thresholds, logit_t)
        return (B, W, routable), args, seq_t

    def _thresholds(self, scheduled: list[ScheduledSeq], routable: bool,
                    per_token: torch.Tensor | None, rows: int) -> torch.Tensor:
        """(rows, routed streams): each row's sequence's thresholds (per position where a
        recomputed position routes at the budget it was first computed at), +inf for
        padding rows and when no row routes."""
        if not routable:
            return torch.full((rows, self.num_routed), math.inf)
        if per_token is None:
            per_token = torch.tensor([t for s in scheduled for _ in range(s.num_new_tokens)
                                      for t in s.seq.thresholds],
                                     dtype=torch.float32).view(-1, self.num_routed)
        pad = torch.full((rows - per_token.shape[0], self.num_routed), math.inf)
        return torch.cat([per_token, pad])

    def _run(self, scheduled: list[ScheduledSeq], kvs: list[SequenceKV]) -> StepOutput:
        per_token = self.forward._token_thresholds(scheduled)
        routable = any_routable(scheduled) or per_token is not None
        key, args, seq_t = self._inputs(scheduled, kvs, routable, per_token,
                                        1 if self._one_row(scheduled) else MIN_SIZE)
        n_rows = sum(s.num_new_tokens for s in scheduled)
        n_logits = sum(len(s.logit_positions) for s in scheduled)
        with torch.inference_mode():
            logits, routed, new_k, new_v, slots = self._call(key, args)
            write_new_kv(self.cache.k, self.cache.v, new_k, new_v, slots)
            routed = routed[:n_rows]
            if n_rows == len(scheduled) == n_logits:
                # Decode rows only (one token, one logit row each): a row's routing is its
                # sequence's counts and its extra steps, and nothing needs it per token
                # (join_outputs). Four operators fewer on every one-row step.
                return StepOutput(logits[:n_logits], routed, routed.sum(1))
            seq_t, logit_t = seq_t[:n_rows], args[8][:n_logits]
            counts = torch.zeros(len(scheduled), self.num_routed,
                                 dtype=torch.long).index_add_(0, seq_t, routed)
            return StepOutput(logits[:n_logits], counts, routed[logit_t].sum(1), routed.bool())

    def _call(self, key: Key, args: tuple):
        variant = variant_of(key)
        fn = self.variants.get(variant)
        if fn is None and self.compile and self.lazy and variant not in self.eager_keys:
            if self.compile_seconds >= self.compile_budget_s:
                log.warning("decode-step compile budget (%.0f s) spent: decode steps (%s) "
                            "run eagerly", self.compile_budget_s, describe(variant))
                self.eager_keys.add(variant)
            else:
                return self._compile_and_call(key, args)
        if fn is None:
            return self._eager(key, args)
        try:
            return fn(*args)
        except Exception as e:                  # a recompile on a guard failure can fail too
            raise CompileError(f"compiled step of {key[0]} rows, {key[1]} blocks wide "
                               f"failed: {e}") from e

    def _eager(self, key: Key, args: tuple):
        k, v, ids, pos, first, tables, lengths, thresholds, logit_rows = args
        return rows_step(self.model, k, v, ids, pos, first, tables, lengths, thresholds,
                         logit_rows, key[2], packed=key[0] > 1)

    def _compile_and_call(self, key: Key, args: tuple):
        """torch.compile is lazy: the first call compiles. Timed and logged."""
        routable = key[2]
        model = self.model

        packed = aot_compile.packed_step(model, key[0] == 1)          # as the packages do

        def step(*a):
            return rows_step(model, *a, routable, packed)

        step = own_code(step)
        start = time.perf_counter()
        try:
            # Only the batch and the table width are symbols: head, block and model sizes
            # stay constants, which inductor's C++ kernels vectorise best.
            _, _, ids, pos, first, tables, lengths, thresholds, logit_rows = args
            if key[0] > 1:
                for t in (ids, pos, first, tables, lengths, thresholds, logit_rows):
                    torch._dynamo.mark_dynamic(t, 0)
            torch._dynamo.mark_dynamic(tables, 2)
            options = None
            if self.backend == "inductor":
                one_row = key[0] == 1
                options = {**self.options,
                           **aot_compile.step_options(one_row, torch.get_num_threads()),
                           **(ONE_ROW_OPTIONS if one_row else {})}
                if one_row:
                    aot_compile.lift_decompose_limit()
            fn = torch.compile(step, fullgraph=True, backend=self.backend, options=options)
            out = fn(*args)
        except Exception as e:
            raise CompileError(f"compiling a step ({key[0]} rows, {key[1]} blocks "
                               f"wide) failed: {e}") from e
        finally:
            self.compile_seconds += time.perf_counter() - start
        if packed:
            self._pack_weights()
        self.variants[variant_of(key)] = fn          # used from the next step on
        self.ready_seconds[variant_of(key)] = time.perf_counter() - start
        log.info("compiled a decode step (%s) in %.1f s (%.0f s of %.0f s compile budget used)",
                 describe(variant_of(key)), time.perf_counter() - start,
                 self.compile_seconds, self.compile_budget_s)
        return out
