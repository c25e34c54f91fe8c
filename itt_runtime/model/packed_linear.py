"""A compiled CPU step's matmuls, on copies of the weights packed once.

torch's CPU matmul (MKL sgemm) scales poorly for a few rows: on this project's shapes (AVX2,
2 threads) a step's matmuls of 8 rows took 3-4x as long as one row's, where the weights are
read once either way. oneDNN's linear on a weight reordered once into its blocked layout ran
them 1.6x faster at 8 rows, 1.3x at 16 to 32, 1.15x at 64 (figures in docs/perf-notes.md,
2026-12-07), but slower for the small q|k|v and o matrices at every size (its fixed cost per
call is about 60 µs). For 1 to ``FEW_ROWS`` rows (every decode step of one sequence, a
verify step of self-speculative decoding, a few decode rows) neither library nor inductor's
own loops read the weights well, so they run a kernel of this project's
(``kernels/few_rows.cpp``, built once per machine by torch's extension builder) on a copy of
the weights in panels of 16 output features: every panel read once for all the rows, the
panels split between the intra-op threads. So:

  * ``pack_model`` (called by cpu_compile.CompiledDecode once a compiled step that uses it
    is ready, fp32 only) keeps, in a registry keyed by the dense weight's storage address,
    each block's gate|up and down weights and the LM head packed for oneDNN, and those and
    each block's q|k|v and output weights in panels (the dense weights stay: eager steps use
    them);
  * ``linear(x, w)`` is a custom operator, so that a compiled step (torch.compile, or
    AOTInductor through its proxy executor) calls it as one opaque op: the kernel on the
    panels for 1 to ``FEW_ROWS`` rows, oneDNN's copy for more, ``F.linear`` where the weight
    has neither (past ``FEW_ROWS`` rows, q|k|v and output stay MKL's, which beat oneDNN on
    them). Results differ from ``F.linear`` only by summation order.

The operator is ``torch.ops.itt_kernels.packed_linear``, in C++ next to the kernel (with its
own registry of the copies), so that a compiled step never enters Python for it: a step
makes 81 such calls on the default model, and through a Python custom operator each cost
about 30 µs. Where the kernel cannot be built (no compiler, no AVX2) it is
``torch.ops.itt.packed_linear``, in Python, with oneDNN only, and one-row steps keep
inductor's loops (aot_compile.packed_step).

Figures (default model, 2 threads, in the compiled steps): the one-row step at budget 1 went
from 3.2 to 2.3 ms when its matmuls moved from inductor's loops to the kernel (the kernel read
gate|up at one row 2.7x faster than those loops, the LM head 1.3x); the verify step of 5
rows from 9.1 to 4.7 ms when the C++ operator replaced the Python one and the kernel was
built with OpenMP (without it, at::parallel_for ran on one thread).

The memory cost: the panels are another copy of every packed weight, oneDNN's of gate|up,
down and the LM head (together about twice a small model's fp32 weights).
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:                     # itt.py imports this module
    from itt_runtime.model.itt import ITTModel

# Rows a weight is packed for (oneDNN picks its blocking from it); measured the same as
# packing for the actual row count at 2 to 64 rows.
PACK_ROWS = 8

# data_ptr of a dense (out, in) weight -> (its shape, the packed copy). An entry is removed
# when its weight is freed (weakref.finalize), so no later tensor at the same address can
# pick it up.
_packed: dict[int, tuple[torch.Size, torch.Tensor]] = {}
# The same, for the copy in panels of ``PANEL`` output features (few_rows.cpp's layout).
_panels: dict[int, tuple[torch.Size, torch.Tensor]] = {}
_lock = threading.Lock()
log = logging.getLogger("itt_runtime")

# Calls of 1 to FEW_ROWS rows run the few-rows kernel on a weight with panels (set in
# few_rows.cpp when it loads). Per matmul, default model, 2 threads, kernel / oneDNN / MKL
# (µs): at 16 rows q|k|v 25 / 42 / 48, gate|up 80 / 101 / 148, down 43 / 62 / 66; at 40 rows
# the four block matmuls 342 against 378 (q|k|v and output MKL's, gate|up and down oneDNN's),
# gate|up alone 176 against 158; at 64 rows even. 40 covers the verify step of 8 streams at
# k = 4: 1.08-1.10x the speculative tokens/s there (docs/perf-notes.md, 2026-12-07,
# midnight); plain steps of 16 and 32 rows measured 0.96-1.09x (noise).
FEW_ROWS = 40
PANEL = 16
KERNEL_SOURCE = Path(__file__).parent / "kernels" / "few_rows.cpp"


@functools.cache
def few_rows_kernel() -> bool:
    """Whether ``torch.ops.itt_kernels.few_rows_linear`` is there: built from
    ``KERNEL_SOURCE`` the first time on a machine (about 30 s; torch's extension builder
    keeps it, under ``$TORCH_EXTENSIONS_DIR``, for later processes) and loaded. False on a
    CPU without AVX2 or where it cannot be built (logged once)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    try:
        from torch.utils import cpp_extension
        # -fopenmp: at::parallel_for splits the panels between threads only when the file
        # is built with OpenMP (the library is torch's own libgomp, found by its soname).
        cpp_extension.load(name="itt_few_rows", sources=[str(KERNEL_SOURCE)],
                           extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as e:                 # no compiler, no ninja, a build error
        log.warning("the few-rows matmul kernel could not be built (%s); oneDNN runs "
                    "matmuls of a few rows", e)
        return False
    torch.library.register_fake("itt_kernels::packed_linear")(_fake_linear)
    torch.ops.itt_kernels.set_few_rows(FEW_ROWS)
    return True


def panels_of(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) -> (out / PANEL, in, PANEL): each panel's PANEL output features for every
    input, contiguous."""
    out_features, in_features = weight.shape
    return weight.detach().contiguous().view(out_features // PANEL, PANEL, in_features) \
        .transpose(1, 2).contiguous()


def available() -> bool:
    return torch.backends.mkldnn.is_available()


@torch.library.custom_op("itt::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)``; through oneDNN's packed copy of ``weight`` when x has
    several rows and ``pack`` made one. x (..., in), weight (out, in). Where the kernel
    file is built, ``linear`` calls its C++ operator instead, which also runs the panels."""
    rows = x.numel() // x.shape[-1]
    entry = _packed.get(weight.data_ptr()) if rows > 1 else None
    if entry is None or entry[0] != weight.shape:
        return F.linear(x, weight)
    flat = x.reshape(rows, x.shape[-1]).contiguous()
    out = torch.ops.mkldnn._linear_pointwise(flat, entry[1], None, "none", [], "")
    return out.view(*x.shape[:-1], weight.shape[0])


@packed_linear.register_fake
def _fake_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.compiler.assume_constant_result         # torch.compile calls it, not traces it
def _kernel_built() -> bool:
    return few_rows_kernel()


def operator() -> str:
    """The operator ``linear`` calls (the module docstring says which, and why)."""
    return "itt_kernels::packed_linear" if few_rows_kernel() else "itt::packed_linear"


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` (the same arguments) through the packed copies of ``weight``."""
    if _kernel_built():
        out = torch.ops.itt_kernels.packed_linear(x, weight)
    else:
        out = torch.ops.itt.packed_linear(x, weight)
    return out if bias is None else out + bias


def pack(weight: torch.Tensor, panels: bool = True, onednn: bool = True) -> int:
    """Register a packed copy of ``weight`` (out, in), fp32 on CPU (with ``onednn``), and with
    ``panels`` (where the few-rows kernel runs and the output features are whole panels) its
    copy in panels. Returns the bytes added."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise ValueError(f"only fp32 CPU weights are packed, got {weight.dtype} on "
                         f"{weight.device}")
    key = weight.data_ptr()
    panels = panels and weight.shape[0] % PANEL == 0 and few_rows_kernel()
    if not (panels or onednn):
        return 0
    with _lock:
        if key in _packed or key in _panels:
            return 0
        packed = panel_copy = None
        if onednn:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(),
                                                             PACK_ROWS)
            _packed[key] = (weight.shape, packed)
        if panels:
            panel_copy = panels_of(weight)
            _panels[key] = (weight.shape, panel_copy)
        if few_rows_kernel():          # the C++ operator's registry: the same tensors
            torch.ops.itt_kernels.register_weight(weight, panel_copy, packed)
    weakref.finalize(weight, _forget, key)
    return weight.numel() * weight.element_size() * (int(onednn) + int(panels))


def _forget(key: int) -> None:
    with _lock:
        _packed.pop(key, None)
        _panels.pop(key, None)
        if few_rows_kernel():
            torch.ops.itt_kernels.forget_weight(key)


def is_packed(weight: torch.Tensor) -> bool:
    return weight.data_ptr() in _packed or weight.data_ptr() in _panels


def pack_model(model: ITTModel) -> int:
    """Pack the weights that gain (module docstring) of a fused fp32 CPU model: each block's
    gate|up and down and the LM head (oneDNN and panels), q|k|v and output (panels). Returns
    the bytes added; 0 where oneDNN is missing."""
    if not available():
        return 0
    total = 0
    for layer in model.itt_layer_list:
        fused = layer.block.fused
        if fused is None:                                     # quantized: nothing to pack
            continue
        total += pack(fused[1]) + pack(layer.block.down_proj.weight)
        # q|k|v and the output projection: panels only (oneDNN was slower than MKL for them
        # at every row count; past FEW_ROWS rows they stay F.linear's).
        total += pack(fused[0], onednn=False) + pack(layer.block.o_proj.weight, onednn=False)
    head = model.head_weight()
    if head is not None:
        total += pack(head)
    return total
