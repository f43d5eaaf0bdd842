"""FP8 GEMM throughput on DeepSeek-V3 linear shapes: dsinfer's Triton fp8_gemm and weight-only GEMM against torch
bf16 matmul (cuBLAS) and torch's block-scaled scaled_mm (cuBLAS FP8), plus the device copy bandwidth.

Prints a markdown table: TFLOP/s, and for M <= 64 the weight bytes read per second (TB/s). Medians of
triton.testing.do_bench (which flushes L2 before each run). Also checks each kernel against its twin on every shape.

    python benchmarks/bench_fp8_gemm.py [--ms 1,16,64,512,4096]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import triton

from dsinfer.kernels import act_quant, fp8_gemm, fp8_weight_only_gemm, weight_quant_torch
from dsinfer.kernels.fp8 import act_dequant_torch, weight_dequant_torch

SHAPES = {"wq_b": (24576, 1536), "wo": (7168, 16384), "expert w1+w3": (4096, 7168), "expert w2": (7168, 2048),
          "dense w1+w3": (36864, 7168)}


def bench(fn) -> float:
    """Median milliseconds."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (TB/s)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench(lambda: dst.copy_(src)) / 1e9


def cublas_fp8(a, a_s, b, b_s):
    """torch's block-scaled FP8 GEMM, or None where this torch has none."""
    F = torch.nn.functional
    if not hasattr(F, "scaled_mm"):
        return None
    from torch.nn.functional import ScalingType
    a_s_cm = a_s.t().contiguous().t()                                       # (M, K/128), column-major
    return lambda: F.scaled_mm(a, b.t(), a_s_cm, ScalingType.BlockWise1x128, b_s.t(), ScalingType.BlockWise128x128,
                               output_dtype=torch.bfloat16)


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ms", default="1,16,64,512,4096")
    args = p.parse_args()
    ms = [int(m) for m in args.ms.split(",")]
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw:.2f} TB/s")
    rows, checks = [], []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda") * 0.02
        wq, ws = weight_quant_torch(w)
        wb = w.bfloat16()
        del w
        w32 = None
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            a, a_s = act_quant(x)
            flops = 2 * m * n * k
            t0 = time.time()
            out = fp8_gemm(a, a_s, wq, ws)                                 # first call autotunes (or reads the cache)
            tune_s = time.time() - t0
            out_wo = fp8_weight_only_gemm(x, wq, ws)
            if m in (1, 64, 4096) and m * n <= 4096 * 24576:
                w32 = weight_dequant_torch(wq, ws, dtype=torch.float32) if w32 is None else w32
                checks.append((name, m, rel_err(out, act_dequant_torch(a, a_s) @ w32.T),
                               rel_err(out_wo, x.float() @ w32.T)))
            t = {"bf16": bench(partial(torch.matmul, x, wb.T)), "fp8": bench(partial(fp8_gemm, a, a_s, wq, ws)),
                 "wo": bench(partial(fp8_weight_only_gemm, x, wq, ws)), "aq": bench(partial(act_quant, x))}
            f = cublas_fp8(a, a_s, wq, ws) if m > 1 else None
            try:
                t["cublas"] = bench(f) if f else None
            except RuntimeError:
                t["cublas"] = None
            rows.append((name, n, k, m, t, flops, tune_s))
            del x, a, a_s
        del wq, ws, wb, w32
        torch.cuda.empty_cache()

    print("\nchecks (relative error vs float32 twin): shape, M, fp8_gemm, weight_only")
    for c in checks:
        print(f"  {c[0]} M={c[1]}: {c[2]:.2e} {c[3]:.2e}")
    print(f"\ncopy bandwidth {bw:.2f} TB/s. TFLOP/s (weight TB/s read for M <= 64); fp8 bytes = N*K, bf16 = 2*N*K")
    print("| shape (N x K) | M | bf16 cuBLAS | cuBLAS FP8 | dsinfer fp8_gemm | fp8_gemm / bf16 time | weight-only "
          "| weight-only / bf16 time | act_quant us | first call s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, n, k, m, t, flops, tune_s in rows:
        def cell(ms_, wbytes):
            if ms_ is None:
                return "not supported"
            s = f"{flops / ms_ / 1e9:.1f}"
            return s + (f" ({wbytes / ms_ / 1e9:.2f} TB/s)" if m <= 64 else "")
        print(f"| {name} {n} x {k} | {m} | {cell(t['bf16'], 2 * n * k)} | {cell(t['cublas'], n * k)} "
              f"| {cell(t['fp8'], n * k)} | {t['fp8'] / t['bf16']:.2f} | {cell(t['wo'], n * k)} "
              f"| {t['wo'] / t['bf16']:.2f} | {t['aq'] * 1e3:.1f} | {tune_s:.1f} |")


if __name__ == "__main__":
    main()
