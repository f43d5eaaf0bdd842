"""Decode-sized FP8 linears (M <= 16): every launch configuration of the block-scaled kernel (tile width, split-K,
pipeline depth, warps) and of the weight-only kernel, timed as decode runs them, so the launch heuristics rest on
measurements rather than the autotuner's noisy microsecond timings.

Each measurement is a CUDA graph of back-to-back calls cycling through enough copies of the weight (>= 256 MB) that
nothing is served from L2, as in a decode step where every layer's weights are new. Prints, per shape and M, the
best few configurations of each kernel with their microseconds and weight TB/s, and what `linear` runs today.

    python benchmarks/sweep_small_m.py [--ms 1,16] [--top 3]
    python benchmarks/sweep_small_m.py --moe-bf16 --moe-ts 1
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton

from dsinfer.kernels import act_quant, fp8_gemm
from dsinfer.kernels import fused_moe as fm
from dsinfer.kernels.fp8_gemm_triton import _fp8_gemm_kernel
from dsinfer.kernels.fused_moe import _moe_gemm_kernel

# (N, K) of DeepSeek-V3's FP8 linears, whole (TP 1) and one rank's slice at TP 8
SHAPES = {"wq_a": (1536, 7168), "wq_b": (24576, 1536), "wkv_a": (576, 7168), "wo": (7168, 16384),
          "dense w1": (18432, 7168), "dense w2": (7168, 18432), "shared w1": (2048, 7168), "shared w2": (7168, 2048),
          "tp8 wq_b": (3072, 1536), "tp8 wo": (7168, 2048), "tp8 dense w1": (2304, 7168),
          "tp8 dense w2": (7168, 2304), "tp8 shared w1": (256, 7168), "tp8 shared w2": (7168, 256)}


def graph_time_us(calls, reps: int = 7) -> float:
    """Median microseconds per call of `calls` (a list of closures) captured back to back in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls[:2]:
            c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return sorted(times)[len(times) // 2]


def block_scaled_call(a, a_s, b, b_s, c, part, bn, split, stages, warps):
    m, k = a.shape
    n = b.shape[0]
    out = c if split == 1 else part[:split]
    grid = (triton.cdiv(m, 16) * triton.cdiv(n, bn), split)

    def call():
        _fp8_gemm_kernel[grid](a, a_s, b, b_s, out, m, n, k, 16, a.stride(0), b.stride(0), n, a_s.stride(0),
                               b_s.stride(0), BLOCK_M=16, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, EVEN_K=k % 128 == 0,
                               SPLIT_K=split, num_warps=warps, num_stages=stages)
        if split > 1:
            torch.sum(out, dim=0, out=c)
    return call


def weight_only_call(x, w, w_s, c, bn, stages, warps):
    m, k = x.shape
    n = w.shape[1]
    grid = (triton.cdiv(m, 16), triton.cdiv(n, bn))

    def call():
        _moe_gemm_kernel[grid](x, c, w, w_s, w, w_s, c, c, c, c, c, c, n, k, m, 1, 0, 0, 0, x.stride(0), 0,
                               w.stride(0), w.stride(1), w_s.stride(0), w_s.stride(1), c.stride(0), 0, BLOCK_M=16,
                               BLOCK_N=bn, BLOCK_K=128, GATED=False, A_PER_TOKEN=False, MUL_ROUTE=False, MODE=1,
                               DENSE=True, PER_SLOT=False, ACCUMULATE=False, SUM_SLOTS=False, DOT_FP32=False,
                               SWIGLU_LIMIT=0.0, num_warps=warps, num_stages=stages)
    return call


def sweep_moe(a) -> None:
    """fused_moe (V3's 256 experts, top-8, 7168 -> 2048) and fused_mlp (shared and dense widths) at decode batch
    sizes, weight-only against block-scaled, over the launch configurations of the MoE kernel."""
    E, D, inter, k = 256, 7168, 2048, 8
    w1, w3 = (torch.randn(E, inter, D, device="cuda").to(torch.float8_e4m3fn) for _ in range(2))
    w2 = torch.randn(E, D, inter, device="cuda").to(torch.float8_e4m3fn)
    s1, s3 = (torch.rand(E, inter // 128, D // 128, device="cuda") + 0.5 for _ in range(2))
    s2 = torch.rand(E, D // 128, inter // 128, device="cuda") + 0.5
    configs = list(itertools.product((16, 32, 64, 128), (4,), (2, 4)))
    default = fm._launch_config
    for T in (int(x) for x in a.moe_ts.split(",")):
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        sets = [torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(T)]) for _ in range(8)]
        rw = torch.rand(T, k, device="cuda")
        gb = len({int(e) for e in sets[0].flatten()}) * 3 * inter * D / 1e9
        for mode in ("weight_only", "block_scaled"):
            results = []
            for bn, st, w in configs:
                fm._launch_config = lambda *_, bn=bn, st=st, w=w: (bn, 128, w, st)
                calls = [lambda i=i: fm.fused_moe(x, rw, sets[i], w1, w2, w3, s1, s2, s3, 0, mode) for i in range(8)]
                results.append((graph_time_us(calls), f"bn={bn} st={st} w={w}"))
            fm._launch_config = default
            base = graph_time_us([lambda i=i: fm.fused_moe(x, rw, sets[i], w1, w2, w3, s1, s2, s3, 0, mode)
                                  for i in range(8)])
            results.sort()
            cells = ", ".join(f"{us:.1f} us {gb / us * 1e3:.2f} TB/s {cfg}" for us, cfg in results[:a.top])
            print(f"fused_moe T={T} ({gb:.2f} GB) {mode}: default {base:.1f} us; best {cells}", flush=True)
    w1 = w2 = w3 = None          # free the 11 GB of experts
    torch.cuda.empty_cache()
    for width in (2048, 18432):
        copies = max(4, -(-512 * 2**20 // (3 * width * D)))
        ws = [[torch.randn(r, c, device="cuda").to(torch.float8_e4m3fn) for r, c in ((width, D), (D, width),
                                                                                  (width, D))]
              for _ in range(copies)]
        ss = [[torch.rand(-(-t.shape[0] // 128), -(-t.shape[1] // 128), device="cuda") + 0.5 for t in w]
              for w in ws]
        gb = 3 * width * D / 1e9
        for T in (int(x) for x in a.moe_ts.split(",")):
            x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
            for mode in ("weight_only", "block_scaled"):
                results = []
                for bn, st, w in configs:
                    fm._launch_config = lambda *_, bn=bn, st=st, w=w: (bn, 128, w, st)
                    calls = [lambda i=i: fm.fused_mlp(x, *ws[i], *ss[i], mode) for i in range(copies)]
                    results.append((graph_time_us(calls), f"bn={bn} st={st} w={w}"))
                fm._launch_config = default
                base = graph_time_us([lambda i=i: fm.fused_mlp(x, *ws[i], *ss[i], mode) for i in range(copies)])
                results.sort()
                cells = ", ".join(f"{us:.1f} us {gb / us * 1e3:.2f} TB/s {cfg}" for us, cfg in results[:a.top])
                print(f"fused_mlp {width} T={T} {mode}: default {base:.1f} us; best {cells}", flush=True)

            def three_linears(i):
                w1_, w2_, w3_ = ws[i]
                s1_, s2_, s3_ = ss[i]
                q, q_s = act_quant(x, 128)
                h = torch.nn.functional.silu(fp8_gemm(q, q_s, w1_, s1_).float()) * fp8_gemm(q, q_s, w3_, s3_).float()
                hq, h_s = act_quant(h.to(torch.bfloat16), 128)
                return fp8_gemm(hq, h_s, w2_, s2_)
            us = graph_time_us([lambda i=i: three_linears(i) for i in range(copies)])
            print(f"fused_mlp {width} T={T} as three fp8_gemm linears: {us:.1f} us {gb / us * 1e3:.2f} TB/s",
                  flush=True)


def sweep_moe_bf16(a) -> None:
    """V2-Lite's bf16 experts (64, top-6, 2048 -> 1408) and shared MLP (2816 wide) at decode sizes: the launch
    configuration (BLOCK_N, BLOCK_K, warps, stages) of each GEMM swept with the other GEMM at its default."""
    E, D, inter, k, shared = 64, 2048, 1408, 6, 2816
    dt = torch.bfloat16
    w1, w3 = (torch.randn(E, inter, D, device="cuda", dtype=dt) * 0.02 for _ in range(2))
    w2 = torch.randn(E, D, inter, device="cuda", dtype=dt) * 0.02
    sw = [[torch.randn(r, c, device="cuda", dtype=dt) * 0.02 for r, c in ((shared, D), (D, shared), (shared, D))]
          for _ in range(8)]
    configs = [(bn, bk, w, st) for bn in (16, 32, 64) for bk in (128, 256) for w, st in ((4, 4), (4, 6))]
    configs += [(16, 128, 2, 4), (32, 64, 4, 8), (128, 128, 4, 4), (16, 256, 2, 6)]
    default = fm._launch_config
    for T in (int(x) for x in a.moe_ts.split(",")):
        x = torch.randn(T, D, device="cuda", dtype=dt)
        sets = [torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(T)]) for _ in range(8)]
        rw = torch.rand(T, k, device="cuda")
        experts = sum(len({int(e) for e in s.flatten()}) for s in sets) / len(sets)
        cases = (("routed", lambda i: fm.fused_moe(x, rw, sets[i], w1, w2, w3), experts, {"gate/up": inter, "down": D}),
                 ("shared", lambda i: fm.fused_mlp(x, *sw[i]), 1, {"gate/up": shared, "down": D}))
        for label, fn, n_experts, n_of in cases:
            gb = n_experts * 3 * (inter if label == "routed" else shared) * D * 2 / 1e9
            base = graph_time_us([lambda i=i: fn(i) for i in range(8)])
            print(f"{label} T={T} ({gb * 1e3:.1f} MB): default {base:.1f} us {gb / base * 1e3:.2f} TB/s", flush=True)
            for which, n in n_of.items():
                results = []
                for cfg in configs:
                    fm._launch_config = lambda bm, act, N, mode, *more, cfg=cfg, n=n: (
                        cfg if N == n else default(bm, act, N, mode, *more))
                    try:
                        results.append((graph_time_us([lambda i=i: fn(i) for i in range(8)]), cfg))
                    except Exception as e:  # out of shared memory / registers
                        print(f"  {cfg}: {type(e).__name__}")
                fm._launch_config = default
                results.sort()
                best = ", ".join(f"{us:.1f} us {cfg}" for us, cfg in results[:a.top])
                every = ", ".join(f"{cfg}={us:.1f}" for us, cfg in sorted(results, key=lambda r: r[1]))
                print(f"  {label} {which} (N={n}) best: {best} | all: {every}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", default="1,16")
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--weight-only", action="store_true", help="also sweep the MoE kernel's weight-only mode")
    p.add_argument("--moe", action="store_true", help="sweep the fused MoE / MLP kernel instead")
    p.add_argument("--moe-ts", default="1,8,32")
    p.add_argument("--moe-bf16", action="store_true", help="sweep V2-Lite's bf16 fused MoE / shared MLP instead")
    a = p.parse_args()
    if a.moe_bf16:
        return sweep_moe_bf16(a)
    if a.moe:
        return sweep_moe(a)
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for name in a.shapes.split(","):
        n, k = SHAPES[name]
        copies = max(8, -(-256 * 2**20 // (n * k)))
        ws = [torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn) for _ in range(copies)]
        w_ss = [torch.rand(triton.cdiv(n, 128), triton.cdiv(k, 128), device="cuda") + 0.5 for _ in range(copies)]
        for m in (int(x) for x in a.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            q, q_s = act_quant(x, 128)
            c = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            part = torch.empty(8, m, n, device="cuda", dtype=torch.float32)
            gb = n * k / 1e9

            def report(label, results):
                results.sort()
                cells = ", ".join(f"{us:.1f} us {gb / us * 1e3:.2f} TB/s {cfg}" for us, cfg in results[:a.top])
                print(f"{name} {n}x{k} M={m} {label}: {cells}", flush=True)

            base = graph_time_us([lambda i=i: fp8_gemm(q, q_s, ws[i], w_ss[i]) for i in range(copies)])
            aq = graph_time_us([lambda: act_quant(x, 128)] * 16)
            report("fp8_gemm today (autotuned)", [(base, "")])
            report("act_quant", [(aq, "")])
            results = []
            k_blocks = triton.cdiv(k, 128)
            for bn, split, stages, warps in itertools.product((32, 64, 128), (1, 2, 4, 8), (3, 4), (4,)):
                if split > 1 and k_blocks // split < 2:
                    continue
                calls = [block_scaled_call(q, q_s, ws[i], w_ss[i], c, part, bn, split, stages, warps)
                         for i in range(copies)]
                results.append((graph_time_us(calls), f"bn={bn} split={split} st={stages} w={warps}"))
            report("block-scaled", results)
            by_cfg = sorted(results, key=lambda r: r[1])
            print(f"{name} M={m} all: " + ", ".join(f"{cfg}={us:.1f}" for us, cfg in by_cfg))
            if not a.weight_only:
                continue
            wbs = [w.view(torch.uint8).unsqueeze(0) for w in ws]
            wss = [s.unsqueeze(0) for s in w_ss]
            results = []
            for bn, stages, warps in itertools.product((16, 32, 64, 128), (3, 4, 6), (2, 4)):
                calls = [weight_only_call(x, wbs[i], wss[i], c, bn, stages, warps) for i in range(copies)]
                results.append((graph_time_us(calls), f"bn={bn} st={stages} w={warps}"))
            report("weight-only", results)
        ws = w_ss = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
