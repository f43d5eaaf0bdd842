"""One-token FP8 linears: the matrix-vector kernel (kernels/fp8_gemv.py, activation quantized inside) against the
path it replaces at M = 1 (act_quant, then the Triton FP8 GEMM with its K-split sum) and bf16 F.linear (cuBLAS),
on DeepSeek-V3 and V4-Flash shapes, with the weight bytes read per second and the device copy bandwidth.

Times are medians of CUDA-graph replays of 20 calls each (a decode step is a graph: launch gaps as there), L2
flushed between replays by a 256 MB write. Each kernel is checked against its twin on every shape.

    python benchmarks/bench_fp8_gemv.py [--only v4] [--configs]   # --configs: every (BLOCK_N, BLOCK_K, warps)
"""

from __future__ import annotations

import argparse

import torch
import triton

from dsinfer.kernels import act_quant, fp8_gemm, weight_quant_torch
from dsinfer.kernels import fp8_gemv_triton as gemv_mod
from dsinfer.kernels.fp8_gemv import fp8_gemv, fp8_gemv_torch

# name: (N, K, groups, gated)
SHAPES = {
    "v3 wq_a+wkv_a": (2112, 7168, 1, False), "v3 wq_b": (24576, 1536, 1, False), "v3 wo": (7168, 16384, 1, False),
    "v3 dense w1+w3": (18432, 7168, 1, True), "v3 dense w2": (7168, 18432, 1, False),
    "v3 shared w1+w3": (2048, 7168, 1, True), "v3 shared w2": (7168, 2048, 1, False),
    "v4 wq_a": (1024, 4096, 1, False), "v4 wq_b": (32768, 1024, 1, False), "v4 wkv": (512, 4096, 1, False),
    "v4 wo_a (8 groups, bf16 x)": (8192, 4096, 8, False), "v4 wo_b": (4096, 8192, 1, False),
    "v4 shared w1+w3": (2048, 4096, 1, True), "v4 shared w2": (4096, 2048, 1, False),
}
REPS = 20


def graph_time(fn) -> float:
    """Median microseconds of one call, from graph replays of REPS calls with L2 flushed before each replay."""
    fn()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(REPS):
            fn()
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(30):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / REPS)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * src.numel() / ms / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", action="store_true", help="also time every launch configuration")
    p.add_argument("--only", default="", help="shapes whose name contains this (e.g. v4)")
    a = p.parse_args()
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"copy bandwidth {copy_bandwidth():.2f} TB/s")
    print("| shape (N x K) | fp8_gemv us (TB/s) | act_quant + fp8_gemm us (TB/s) | bf16 F.linear us (TB/s) | "
          "max err / twin |")
    print("|---|---|---|---|---|")
    for name, (N, K, groups, gated) in SHAPES.items():
        if a.only not in name:
            continue
        x = torch.randn(1, K * groups, device="cuda").to(torch.bfloat16)
        w, s = weight_quant_torch(torch.randn(N, K, device="cuda") * 0.02, scale_fmt="ue8m0")
        w3, s3 = weight_quant_torch(torch.randn(N, K, device="cuda") * 0.02, scale_fmt="ue8m0") if gated else \
            (None, None)
        quantize = groups == 1
        kw = dict(w3=w3, w3_s=s3, quantize=quantize, groups=groups, scale_fmt="ue8m0" if quantize else None)
        got, want = fp8_gemv(x, w, s, **kw).float(), fp8_gemv_torch(x, w, s, **kw).float()
        err = ((got - want).abs().max() / want.abs().max()).item()
        nbytes = N * K * (2 if gated else 1)
        t_gemv = graph_time(lambda: fp8_gemv(x, w, s, **kw))
        wd = w.to(torch.bfloat16)
        if gated:
            wd = torch.cat([wd, w3.to(torch.bfloat16)])
            wcat, scat = torch.cat([w, w3]), torch.cat([s, s3])
        else:
            wcat, scat = w, s
        xs = x[:, :K]
        if quantize:
            t_gemm = graph_time(lambda: fp8_gemm(*act_quant(xs, 128, "ue8m0"), wcat, scat))
            gemm = f"{t_gemm:.1f} ({nbytes / t_gemm / 1e6:.2f})"
        else:
            gemm = "-"
        t_lin = graph_time(lambda: torch.nn.functional.linear(xs, wd))
        print(f"| {name} {N} x {K} | {t_gemv:.1f} ({nbytes / t_gemv / 1e6:.2f}) | {gemm} | "
              f"{t_lin:.1f} ({2 * nbytes / t_lin / 1e6:.2f}) | {err:.1e} |")
        if a.configs:
            chosen = gemv_mod.gemv_config
            default = chosen(N, K, groups)
            for bn in (2, 4, 8, 16, 32):
                for bk in (512, 1024, 2048):
                    for warps in (2, 4):
                        if bk > triton.next_power_of_2(K) or (groups > 1 and (N // groups) % bn):
                            continue
                        gemv_mod.gemv_config = lambda *_, c=(bn, bk, warps): c
                        t = graph_time(lambda: fp8_gemv(x, w, s, **kw))
                        mark = " (default)" if (bn, bk, warps) == default else ""
                        print(f"    BLOCK_N {bn:2d} BLOCK_K {bk:4d} warps {warps}: {t:6.1f} us{mark}")
            gemv_mod.gemv_config = chosen


if __name__ == "__main__":
    main()
