"""Weight-only quantized matmuls on this CPU, against fp32, for decode-sized inputs.

For each weight shape (SmolLM2-135M's projections and its 49k-row LM head) and each row
count (1 = one decoding sequence, 8, 32), times ``x @ Wᵀ`` with the weight stored as:

- fp32 (the baseline; input-major, as the loader stores it on CPU) and bf16;
- int8 per output channel through torch's ``_weight_int8pack_mm``;
- int4 in groups of 32 through torch's ``_weight_int4pack_mm_for_cpu``;
- int8 dequantized inside a ``torch.compile``d function (inductor's fused loop);
- int8 weights with dynamically quantized int8 activations through fbgemm's AVX2 kernels
  (``torch.ao.quantization.quantize_dynamic``, per output channel; deprecated in favour of
  torchao, but the only int8 path here that beats fp32, on the large matrices).

Prints one markdown row per (shape, rows, kind): microseconds per call (median of
interleaved repeats) and the speed relative to fp32 measured in the same run.

    python scripts/bench_quant.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

SHAPES = {"q/o proj 576x576": (576, 576), "gate/up 1536x576": (1536, 576),
          "down 576x1536": (576, 1536), "lm head 49152x576": (49152, 576)}


def int8_channels(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(1).clamp(min=1e-8) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def kinds(w: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    w_in = w.t().contiguous()                          # input-major, as served
    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "fp32": lambda x: x @ w_in,
        "bf16": (lambda wb: lambda x: (x.bfloat16() @ wb).float())(w_in.bfloat16()),
    }
    q8, s8 = int8_channels(w)
    if hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        out["int8 (_weight_int8pack_mm)"] = lambda x: torch.ops.aten._weight_int8pack_mm(
            x, q8, s8)
    try:
        packed, sz = int4_pack(w)
        out["int4 g32 (_weight_int4pack_mm_for_cpu)"] = \
            lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
    except (RuntimeError, AttributeError) as e:
        print(f"int4: not available ({type(e).__name__}: {str(e).splitlines()[0][:80]})")

    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data.copy_(w)
    per_channel = torch.ao.quantization.per_channel_dynamic_qconfig
    dynamic = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear),
                                                     {torch.nn.Linear: per_channel})
    out["int8 dynamic (fbgemm)"] = dynamic

    @torch.compile(dynamic=False)
    def dequant_mm(x, q, s):
        return x @ (q.float() * s[:, None]).t()
    out["int8 (compiled dequant + mm)"] = lambda x: dequant_mm(x, q8, s8)
    return out


def int4_pack(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's int4 CPU layout: uint8 pairs of nibbles, scales and zeros per group."""
    n, k = w.shape
    g = w.view(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    q = q.view(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    zero = lo + 8 * scale                         # torch's zero point: value at nibble 8
    sz = torch.stack([scale.t(), zero.t()], -1).contiguous()    # (k/group, n, 2)
    return packed, sz


def median_us(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(10):
            fn()
        times.append((time.perf_counter() - start) / 10 * 1e6)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", default="1,8,32")
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {a.threads} thread(s)")
    print("| weight | rows | kind | µs per call | speed vs fp32 | max error vs fp32 |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k) * 0.05
            fns = kinds(w)
            for rows in map(int, a.rows.split(",")):
                x = torch.randn(rows, k)
                ref = fns["fp32"](x)
                for fn in fns.values():        # warm-up (and compile)
                    fn(x)
                results: dict[str, list[float]] = {kind: [] for kind in fns}
                for _ in range(3):             # interleaved rounds
                    for kind, fn in fns.items():
                        results[kind].append(median_us(lambda f=fn, x=x: f(x),
                                                       a.repeats // 3))
                base = statistics.median(results["fp32"])
                for kind, fn in fns.items():
                    us = statistics.median(results[kind])
                    err = (fn(x) - ref).abs().max().item()
                    print(f"| {name} | {rows} | {kind} | {us:.0f} | {base / us:.2f} | "
                          f"{err:.3g} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
