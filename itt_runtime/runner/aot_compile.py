"""Decode steps compiled ahead of time (AOTInductor) in a process of their own, and kept on
disk, so that a server is fast by default without waiting (``--compile auto``).

``torch.compile`` in the server's own process (cpu_compile.py) has two costs a server cannot
hide: its tracing holds the GIL that every eager operator needs, so the steps served while a
variant compiles ran 10-25x slower; and a restart traces every variant again (2 min on a
2-core CPU with a warm inductor cache). Here instead:

  * a child process (``python -m itt_runtime.runner.aot_compile``, at the lowest CPU
    priority) loads the same checkpoint, exports each decode-step variant with
    ``torch.export`` and compiles it with AOTInductor into a package (``.pt2``: a shared
    library and its metadata);
  * the server loads each package as the child finishes it and uses it from the next step:
    a plain C++ call, no tracing, no Python wrapper;
  * packages stay in the compile cache (``cache_dir()/aot``), named by a
    signature of everything the compiled code depends on: the model's configuration and its
    tensors' shapes, strides and dtypes, the KV block layout, the variant, the inductor
    options (with the server's thread count), torch's version and the source of the
    modules the step runs. A second start of the same model (or of another checkpoint of
    the same architecture) loads them in a second; any change misses and compiles again.

The weights are not in the packages: each loaded step is handed the model's own tensors by
name (``load_constants``, user-managed), so the four variants and the eager path share one
copy of the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from itt_runtime.model import packed_linear
from itt_runtime.model.itt import ITTModel
from itt_runtime.runner.decode_step import rows_step

log = logging.getLogger("itt_runtime")

Variant = tuple[bool, bool]          # (one row, any row routable), as in cpu_compile.py

# Inductor options of the packages. No ``freezing``: the weights stay inputs of the compiled
# code (handed over at load), not constants folded into it. ``cpp.weight_prepack`` as for
# the in-process compile (cpu_compile.INDUCTOR_OPTIONS); ``cpp.threads`` per variant
# (``package_options``).
PACKAGE_OPTIONS: dict[str, Any] = {"cpp.weight_prepack": False,
                                   "aot_inductor.package_constants_in_so": False}
# Modules whose source the compiled step runs: a change to any misses the cache.
SOURCES = ("itt_runtime/runner/decode_step.py", "itt_runtime/runner/aot_compile.py",
           "itt_runtime/model/itt.py", "itt_runtime/model/layers.py",
           "itt_runtime/model/packed_linear.py", "itt_runtime/model/quantization.py",
           "itt_runtime/model/kernels/few_rows.cpp")
MAX_ROWS = 4096                      # the symbolic batch size's bound (a step of several rows)


def variant_name(variant: Variant) -> str:
    return ("one-row" if variant[0] else "rows") + ("-routed" if variant[1] else "-budget0")


class StepModule(nn.Module):
    """``rows_step`` of one variant as a module: what ``torch.export`` takes. Its state is
    the model's, under ``model.``; the KV cache and the step's integers are inputs."""

    def __init__(self, model: ITTModel, routable: bool, packed: bool = False) -> None:
        super().__init__()
        self.model = model
        self.routable = routable
        self.packed = packed

    def forward(self, k_cache, v_cache, ids, pos, first, tables, lengths, thresholds,
                logit_rows):
        return rows_step(self.model, k_cache, v_cache, ids, pos, first, tables, lengths,
                         thresholds, logit_rows, self.routable, self.packed)


def packed_step(model: ITTModel, one_row: bool) -> bool:
    """Whether a step's matmuls go through model/packed_linear.py: always for several rows;
    for one row where its kernel is built and the model's matmuls are fp32 ones (at one row
    the kernel read the weights 1.3-2.5x faster than inductor's own loops; elsewhere those
    loops beat MKL's one-row matmul)."""
    if not one_row:
        return True
    return (packed_linear.few_rows_kernel() and model.head_weight() is not None
            and model.embed_tokens.weight.dtype == torch.float32)


def model_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, shared ones under each of their names (a compiled
    step asks for its constants by the name it saw)."""
    named = module.named_parameters(remove_duplicate=False)
    return {**dict(named), **dict(module.named_buffers(remove_duplicate=False))}


# A one-row step's matmuls are matrix-vector products: memory-bound, and MKL runs them on one
# thread whatever the intra-op count (the default model's step read its 31.6 MB of weights at
# about 16 GB/s on one core of this 2-core machine, 68 % of the step in ``sgemv``). Inductor's
# decompose_mm_pass rewrites an mm whose first dimension is 1 as a product and a sum, which
# it fuses into loops of its own, parallel over the output features: the default model's
# budget-0 one-row step went 1.87 -> 1.20 ms on 2 threads (docs/perf-notes.md, 2026-12-07,
# late night). Its CPU size limit (2,048 on the other dimensions) would leave out the LM head
# and SmolLM2's fused gate/up, so it is lifted.
ONE_ROW_MATMULS = {"post_grad_fusion_options": {"decompose_mm_pass": {
    "cpu_max_other_dimension_decomposition": 1 << 30}}}


def step_options(one_row: bool, threads: int) -> dict[str, Any]:
    """The inductor options every compiled step gets, ahead of time or in process, for a
    process of ``threads`` intra-op threads: its fused loops run on all of them (at 32 rows
    on 2 threads the attention loops took 0.55x the time of one thread's, the step 0.81x),
    and a one-row step's matmuls are such loops too (``ONE_ROW_MATMULS``; with one thread
    the default model's one-row step took 1.5x longer). Call ``lift_decompose_limit`` before
    compiling a one-row step."""
    return {"cpp.threads": max(1, threads), **(ONE_ROW_MATMULS if one_row else {})}


def package_options(variant: Variant, threads: int) -> dict[str, Any]:
    """The inductor options of one variant's package, for a server of ``threads`` intra-op
    threads (``step_options``). The count is baked into the generated code, so it is part of
    the signature."""
    return {**PACKAGE_OPTIONS, **step_options(variant[0], threads)}


def lift_decompose_limit() -> None:
    """``ONE_ROW_MATMULS``'s size limit where the pass reads it: decompose_mem_bound_mm reads
    its options once, when it is imported, so a limit passed with a compile's options only
    counts if the module was not imported yet. Set on the module as well (if this torch has
    it; without, the pass keeps its own limit and the larger matmuls stay MKL's)."""
    try:
        from torch._inductor.fx_passes import decompose_mem_bound_mm as decompose
    except ImportError:
        return
    limit = ONE_ROW_MATMULS["post_grad_fusion_options"]["decompose_mm_pass"][
        "cpu_max_other_dimension_decomposition"]
    if hasattr(decompose, "cpu_max_other_dimension_decomposition"):
        decompose.cpu_max_other_dimension_decomposition = limit


def signature(model: ITTModel, cache_k: torch.Tensor, variant: Variant, threads: int) -> str:
    """The compile-cache key of one variant for this model, KV layout and thread count (hex
    sha256)."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()

    def add(*parts: object) -> None:
        h.update(repr(parts).encode())

    # Packed steps call the C++ operator of kernels/few_rows.cpp where it could be built here,
    # the Python one elsewhere; one-row steps are packed only where it is (packed_step).
    add("itt-aot-decode/1", torch.__version__, variant,
        sorted(package_options(variant, threads).items()), MAX_ROWS, packed_linear.operator(),
        packed_step(model, variant[0]))
    add(dataclasses.asdict(model.cfg) if dataclasses.is_dataclass(model.cfg) else model.cfg)
    add(tuple(cache_k.shape[1:]), cache_k.dtype)
    for name, t in sorted(model_tensors(model).items()):
        add(name, tuple(t.shape), t.stride(), t.dtype)
    for rel in SOURCES:
        h.update((root / rel).read_bytes())
    return h.hexdigest()


def package_path(model: ITTModel, cache_k: torch.Tensor, variant: Variant,
                 threads: int) -> Path:
    """Where the package of one variant for this model, KV layout and thread count lives."""
    key = signature(model, cache_k, variant, threads)[:32]
    return cache_dir() / "aot" / f"{variant_name(variant)}-{key}.pt2"


def example_args(model: ITTModel, cache_k: torch.Tensor, variant: Variant) -> tuple:
    """Inputs of the shapes a variant is exported at: two rows with two logit rows (one of
    each for the one-row variant), tables two blocks wide, a cache of
    three blocks of ``cache_k``'s layout; every row a padding row on the scratch block (its
    outputs are never used)."""
    one_row, routable = variant
    cfg = model.cfg
    B, W, blocks = (1 if one_row else 2), 2, 3
    streams = cfg.num_kv_streams if routable else cfg.n_layers
    k = torch.zeros(blocks, *cache_k.shape[1:], dtype=cache_k.dtype)
    # Every input a tensor of its own: export traces two arguments given the same tensor as
    # one input, and the compiled step would then read one where the other was meant.
    return (k, torch.zeros_like(k), torch.zeros(B, dtype=torch.long),
            torch.zeros(B, dtype=torch.long), torch.arange(B),
            torch.full((B, streams, W), blocks - 1, dtype=torch.long),
            torch.zeros(B, streams, dtype=torch.long),
            torch.full((B, cfg.max_extra_steps), float("inf")), torch.arange(B))


def compile_package(model: ITTModel, cache_k: torch.Tensor, variant: Variant,
                    path: Path, threads: int) -> None:
    """Export and compile one variant into the package ``path`` (written whole or not at all:
    a temporary name, then a rename)."""
    from torch.export import Dim, export

    one_row, routable = variant
    blocks, width = Dim("blocks", min=2), Dim("width", min=2)
    if one_row:
        dynamic: Any = ({0: blocks}, {0: blocks}, None, None, None, {2: width}, None, None,
                        None)
    else:
        rows = Dim("rows", min=2, max=MAX_ROWS)
        logits = Dim("logits", min=2, max=MAX_ROWS)
        dynamic = ({0: blocks}, {0: blocks}, {0: rows}, {0: rows}, {0: rows},
                   {0: rows, 2: width}, {0: rows}, {0: rows}, {0: logits})
    # A packed step (packed_step) calls packed_linear for its matmuls (model/packed_linear.py:
    # the kernel or oneDNN on packed weights, which the server registers; the child needs
    # none, it only traces).
    step = StepModule(model, routable, packed=packed_step(model, one_row)).eval()
    if one_row:
        lift_decompose_limit()
    with torch.inference_mode():
        exported = export(step, example_args(model, cache_k, variant), dynamic_shapes=dynamic,
                          strict=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
    try:
        torch._inductor.aoti_compile_and_package(exported, package_path=str(partial),
                                                 inductor_configs=package_options(variant, threads))
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


# Packages not used for this long are deleted when a server starts (``prune``): every code
# or torch upgrade leaves a set behind (3-5 MB per variant for the default model).
PRUNE_AFTER_DAYS = 30


def prune(keep: set[Path], now: float | None = None) -> list[Path]:
    """Delete the compile cache's packages (and unfinished ``.partial`` ones) that were
    neither written nor loaded in ``PRUNE_AFTER_DAYS`` (``load_package`` marks a package used
    by its modification time), except ``keep``. Returns what was deleted."""
    folder = cache_dir() / "aot"
    cutoff = (time.time() if now is None else now) - PRUNE_AFTER_DAYS * 86400
    gone = []
    for path in sorted(folder.glob("*.pt2")) if folder.is_dir() else []:
        try:
            if path not in keep and path.stat().st_mtime < cutoff:
                path.unlink()
                gone.append(path)
        except OSError:                 # another server pruned or wrote it meanwhile
            continue
    return gone


class FlatStep:
    """A loaded package called with a step's arguments as they are; its outputs as a list.

    ``AOTICompiledModel.__call__`` parses the package's input and output specs on every call
    (two JSON loads, a pytree flatten and an unflatten): 30 µs, a few hundredths of a
    one-row step of the default model. A step's arguments are already a flat tuple of
    tensors and its outputs a flat tuple, so the constructor checks that once against the
    specs and every call goes straight to the runner."""

    def __init__(self, compiled) -> None:
        self.loader = compiled.loader
        in_spec, out_spec = (pytree.treespec_loads(s) for s in self.loader.get_call_spec())
        self.num_inputs = in_spec.num_leaves
        flat_args = pytree.tree_flatten((tuple(range(self.num_inputs)), {}))[1]
        flat_outputs = pytree.tree_flatten(tuple(range(out_spec.num_leaves)))[1]
        if in_spec != flat_args or out_spec != flat_outputs:
            raise RuntimeError(f"the compiled step's calling convention is not flat tensors: "
                               f"{in_spec} -> {out_spec}")

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        if len(args) != self.num_inputs:
            raise TypeError(f"the compiled step takes {self.num_inputs} tensors, "
                            f"got {len(args)}")
        return self.loader.boxed_run(list(args))


def load_package(model: ITTModel, path: Path) -> FlatStep:
    """A compiled variant from its package, its weights the model's own tensors (no copy).
    Called like ``rows_step`` without the model and ``routable``; returns its outputs as a
    list (``FlatStep``)."""
    packed_linear.few_rows_kernel()     # its operators, which a package may call, registered
    compiled = torch._inductor.aoti_load_package(str(path))
    tensors = model_tensors(StepModule(model, True))
    wanted = compiled.get_constant_fqns()
    missing = [n for n in wanted if n not in tensors]
    if missing:
        raise RuntimeError(f"{path}: the compiled step needs tensors the model does not have: "
                           f"{missing[:5]}")
    compiled.load_constants({n: tensors[n] for n in wanted}, check_full_update=True,
                            user_managed=True)
    try:
        os.utime(path)                  # used now: kept by ``prune``
    except OSError:
        pass
    return FlatStep(compiled)


@functools.cache
def cache_dir() -> Path:
    """Where inductor keeps its compiled artefacts across restarts (its FX graph and AOT
    caches, keyed by the graph, the options and torch's version, so a code or torch change
    misses) and the ahead-of-time compiled steps (``aot/``, aot_compile.py):
    ``$TORCHINDUCTOR_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/itt-server/inductor``
    (``~/.cache/itt-server/inductor``). Deleting the folder clears it.

    Resolved once, on the first call (CompiledDecode calls it before any compile), and
    pinned in ``TORCHINDUCTOR_CACHE_DIR``: inductor sets that variable to its own default
    (under /tmp) the first time it looks, which would move the cache in mid-run."""
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given:
        path = Path(given)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = Path(base) / "itt-server" / "inductor"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


# --- the child process -------------------------------------------------------------------

def child_command(model_path: Path, dtype: torch.dtype, block_size: int, threads: int,
                  jobs: list[tuple[Variant, Path]], quantization: str = "none") -> list[str]:
    """The command line of a child that compiles ``jobs`` (variant, package path) for a
    server of ``threads`` intra-op threads whose model is quantized by ``quantization``."""
    spec = [{"one_row": v[0], "routable": v[1], "path": str(p)} for v, p in jobs]
    return [sys.executable, "-m", "itt_runtime.runner.aot_compile", "--model", str(model_path),
            "--dtype", str(dtype).replace("torch.", ""), "--block-size", str(block_size),
            "--threads", str(threads), "--quantization", quantization,
            "--jobs", json.dumps(spec)]


def _child_setup() -> None:
    """In the compile child before it starts: the lowest CPU priority, so that the server's
    steps come first on a small machine; and (Linux) killed when the server exits, so that
    no compile outlives it."""
    os.nice(19)
    if sys.platform == "linux":
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def run_child(command: list[str], variants: list[Variant]
              ) -> Iterator[tuple[str, Variant, float, str]]:
    """Run a compile child (at the lowest CPU priority) for ``variants`` and yield its
    reports, one per variant: ("ready", variant, seconds, "") or ("failed", variant,
    seconds, reason). A child that dies without reporting a variant yields "failed" for it."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir()), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, preexec_fn=_child_setup)
    stderr_tail: list[str] = []

    def drain() -> None:                       # keep the child's stderr pipe from filling
        assert proc.stderr is not None
        for line in proc.stderr:
            stderr_tail.append(line)
            del stderr_tail[:-20]

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    reported: set[Variant] = set()
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        variant = (bool(msg["one_row"]), bool(msg["routable"]))
        reported.add(variant)
        yield msg["status"], variant, float(msg["seconds"]), msg.get("error", "")
    proc.wait()
    reader.join(timeout=5)
    for variant in variants:
        if variant not in reported:
            yield ("failed", variant, 0.0, f"the compile process exited with {proc.returncode}: "
                   + "".join(stderr_tail[-5:]).strip())


def main(argv: list[str] | None = None) -> int:
    """Child process: load the checkpoint as the engine does, compile each job's variant and
    report each on stdout as one JSON line when its package is in place."""
    from itt_runtime.model import quantization
    from itt_runtime.model.loader import load_checkpoint
    from itt_runtime.runner.attention import KVCache

    p = argparse.ArgumentParser(prog="python -m itt_runtime.runner.aot_compile")
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--block-size", type=int, required=True)
    p.add_argument("--threads", type=int, default=1,
                   help="the server's intra-op threads (its packages' fused loops use them)")
    p.add_argument("--quantization", default="none",
                   help="the server's --quantization (the compiled step calls its kernels)")
    p.add_argument("--jobs", required=True, help="JSON list of {one_row, routable, path}")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    loaded = load_checkpoint(args.model, "cpu", dtype, fuse=True)
    model = loaded.model.eval()
    if args.quantization != "none":
        # The layout the server's model has; the weights' values do not matter here (the
        # package is handed the server's at load), so a few tokens calibrate.
        quantization.quantize_model(model, args.quantization,
                                    quantization.calibration_ids(loaded.tokenizer, 16))
    cfg = model.cfg
    cache_k = KVCache(1, args.block_size, cfg.n_kv_heads, cfg.head_dim, dtype,
                      torch.device("cpu")).k
    for job in json.loads(args.jobs):
        variant = (bool(job["one_row"]), bool(job["routable"]))
        path = Path(job["path"])
        report: dict[str, Any] = {"one_row": variant[0], "routable": variant[1]}
        start = time.perf_counter()
        try:
            if package_path(model, cache_k, variant, args.threads).name != path.name:
                raise RuntimeError("the model loaded by the compile process differs from the "
                                   "server's (its signature does not match)")
            if not path.exists():
                compile_package(model, cache_k, variant, path, args.threads)
            report["status"] = "ready"
        except Exception as e:                  # reported; the server keeps it eager
            logging.getLogger(__name__).exception("compiling %s failed", variant_name(variant))
            report.update(status="failed", error=f"{type(e).__name__}: {e}")
        report["seconds"] = round(time.perf_counter() - start, 2)
        print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
