"""DeepSeek-V4's FP4 routed experts at decode sizes (256 experts, top-6, 4096 -> 2048): the fused MoE's FP4 paths
timed as decode runs them (CUDA graphs of back-to-back calls over distinct experts, so weights come from HBM),
each checked against the twin, then the grouped GEMM's launch configurations.

Paths: "bit decode" (our e2m1 decoder feeding bf16 dots), "scaled dot" (Triton's microscaling dot_scaled, the
default from two tokens), and at one token "gemv" (fp4_gemv_triton.py, the default there).

    python benchmarks/sweep_fp4_moe.py [--ts 1,32] [--configs]
"""

from __future__ import annotations

import argparse
import itertools

import torch
from sweep_small_m import graph_time_us

from dsinfer.kernels import fp4_gemv_triton as gv
from dsinfer.kernels import fused_moe as fm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ts", default="1,32")
    p.add_argument("--configs", action="store_true", help="also sweep the grouped GEMM's launch configurations")
    p.add_argument("--gemv-configs", action="store_true", help="also sweep the one-token GEMV's configurations")
    a = p.parse_args()
    dev, E, D, inter, k = "cuda", 256, 4096, 2048, 6
    g = torch.Generator(dev).manual_seed(0)

    def codes(n, m):
        return torch.randint(0, 256, (E, n, m // 2), dtype=torch.uint8, device=dev, generator=g)

    def scales(n, m):
        return torch.randint(118, 124, (E, n, m // 32), dtype=torch.uint8, device=dev, generator=g)
    w1, w3, w2 = codes(inter, D), codes(inter, D), codes(D, inter)
    s1, s3, s2 = scales(inter, D), scales(inter, D), scales(D, inter)
    per_expert = 3 * inter * D // 2 + 3 * inter * D // 32
    default_cfg, default_sd, default_gemv = fm._launch_config, fm._scaled_dot, fm._fp4_gemv
    for T in (int(t) for t in a.ts.split(",")):
        x = (torch.randn(T, D, device=dev, generator=g) * 0.5).bfloat16()
        rw = torch.rand(T, k, device=dev, generator=g)
        sets = [torch.stack([torch.randperm(E, device=dev, generator=g)[:k] for _ in range(T)]) for _ in range(8)]
        gb = sum(len(torch.unique(s)) for s in sets) / len(sets) * per_expert / 1e9
        ref = fm.fused_moe_torch(x, rw, sets[0], w1, w2, w3, s1, s2, s3, 0, "fp4_weight_only", 10.0, True)

        def run(i):
            return fm.fused_moe_slots(x, rw, sets[i], w1, w2, w3, s1, s2, s3, 0, "fp4_weight_only", 10.0, True)

        def timed(reps=7):
            return graph_time_us([lambda i=i: run(i) for i in range(8)], reps)

        paths = {"bit decode": (False, False), "scaled dot": (True, False)}
        if T == 1:
            paths["gemv"] = (True, True)
        for name, (sd, gemv) in paths.items():
            fm._scaled_dot = default_sd if sd else (lambda mode, a_: False)
            fm._fp4_gemv = default_gemv if gemv else (lambda T_, mode: False)
            err = ((run(0).out.view(T, k, D).sum(1) - ref).abs().max() / ref.abs().max()).item()
            us = timed()
            print(f"T={T} {name}: {us:.1f} us, {gb / us * 1e3:.2f} TB/s of {gb * 1e3:.0f} MB (max error {err:.1e} "
                  f"of the largest output)", flush=True)
        if T == 1 and a.gemv_configs:
            sweep_gemv(timed)
        fm._fp4_gemv = lambda T_, mode: False
        if not a.configs:
            continue
        for which in ("gate/up", "down"):
            results = []
            for c in itertools.product((16, 32, 64), (128, 256), (4, 8), (2, 4)):
                def cfg(block_m, active, N, mode, eb=2, which=which, c=c):
                    return c if (N == inter) == (which == "gate/up") else default_cfg(block_m, active, N, mode, eb)
                fm._launch_config = cfg
                try:
                    results.append((timed(5), c))
                except Exception as exc:  # noqa: BLE001  (a deep config can overflow shared memory)
                    print(f"  {which} {c}: {type(exc).__name__}", flush=True)
            fm._launch_config = default_cfg
            print(f"T={T} scaled dot, best (BLOCK_N, BLOCK_K, warps, stages) for {which}: "
                  + "; ".join(f"{c} {us:.1f} us" for us, c in sorted(results)[:4]), flush=True)
        fm._scaled_dot, fm._fp4_gemv = default_sd, default_gemv


def sweep_gemv(timed) -> None:
    """The one-token GEMV's (BLOCK_N, BLOCK_B, num_warps), for gate/up and down separately."""
    default = gv._gemv_config
    for which in ("gate/up", "down"):
        results = []
        for c in itertools.product((4, 8, 16, 32), (256, 512, 1024), (2, 4, 8)):
            def cfg(N, K, slots, gated, c=c, which=which):
                return c if gated == (which == "gate/up") else default(N, K, slots, gated)
            gv._gemv_config = cfg
            try:
                results.append((timed(5), c))
            except Exception as exc:  # noqa: BLE001  (a large tile can run out of registers)
                print(f"  gemv {which} {c}: {type(exc).__name__}", flush=True)
        gv._gemv_config = default
        print(f"T=1 gemv, best (BLOCK_N, BLOCK_B, warps) for {which}: "
              + "; ".join(f"{c} {us:.1f} us" for us, c in sorted(results)[:6]), flush=True)


if __name__ == "__main__":
    main()
