"""Decode attention over the paged latent cache: achieved bandwidth against the device's copy bandwidth.

DeepSeek-V3 attention shapes (128 heads, latent 512 + rope 64, bf16, 64-token pages; V2-Lite: --heads 16). Bytes
counted per call: the cache rows read (batch x context x 576 x 2) plus queries and outputs. Usage:
    python benchmarks/bench_mla_decode.py [--batch 1 16 64 128] [--context 1024 4096 32768]
    python benchmarks/bench_mla_decode.py --heads 16 --batch 1 --context 80 2080 --grid-len 163840 --rotate
(--grid-len: the max_seq_len the grid is sized for, as the engine's CUDA graphs launch it; --rotate: q_pe rotated
in the kernel, as MLA runs it.)
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton

from dsinfer.kernels.mla_triton import mla_attention


def copy_bandwidth() -> float:
    x = torch.empty(2**30 // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x))
    return 2 * x.numel() * 2 / ms / 1e9                   # TB/s, bytes read + written


def bench(batch: int, context: int, heads=128, rank=512, rope=64, page_size=64, config=None,
          graph=True, grid_len: int | None = None, rotate: bool = False) -> tuple[float, float]:
    """(microseconds, TB/s) of one decode attention call; graph=True times it replayed in a CUDA graph, as the
    engine's decode step runs, so host launch overhead is not counted."""
    pages_per_seq = -(-context // page_size)
    kv = torch.randn(batch * pages_per_seq, page_size, rank + rope, dtype=torch.bfloat16, device="cuda")
    tables = torch.randperm(batch * pages_per_seq, device="cuda").view(batch, pages_per_seq).int()
    q_latent = torch.randn(batch, heads, rank, dtype=torch.bfloat16, device="cuda")
    q_pe = torch.randn(batch, heads, rope, dtype=torch.bfloat16, device="cuda")
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    cos_sin = torch.randn(batch, rope // 2, 2, device="cuda") if rotate else None
    fn = lambda: mla_attention(q_latent, q_pe, kv, tables, cu, lens, 0.1352, 1, grid_len or context,  # noqa: E731
                               config=config, cos_sin=cos_sin)
    fn()
    ms = triton.testing.do_bench_cudagraph(fn, rep=50) if graph else triton.testing.do_bench(fn, warmup=10, rep=50)
    nbytes = batch * context * (rank + rope) * 2 + batch * heads * (2 * rank + rope) * 2
    return ms * 1e3, nbytes / ms / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 32, 64, 128])
    p.add_argument("--context", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--sweep", action="store_true", help="try launch configurations at a few points first")
    p.add_argument("--sweep-keys", type=int, nargs="+", default=[32, 64], help="block_n values the sweep tries")
    p.add_argument("--sweep-stages", type=int, nargs="+", default=[2],
                   help="num_stages values the sweep tries (with 2, ptxas serializes the kernel's wgmma at V3 "
                        "shapes: tools/compile_sm90.py, BENCHMARKS.md)")
    p.add_argument("--heads", type=int, default=128)
    p.add_argument("--min-split", type=int, help="the minimum keys per split (default: the kernel's)")
    p.add_argument("--grid-len", type=int, help="max_seq_len for the grid (default: the context)")
    p.add_argument("--rotate", action="store_true", help="rotate q_pe in the kernel")
    args = p.parse_args()
    best = None
    if args.sweep:
        for b, c in [(1, 8192), (16, 4096), (128, 1024)]:
            results = []
            for bh in (32, 64):
                for bv in (512, 256, 128):
                    for bn, warps, stages in itertools.product(args.sweep_keys, (4, 8), args.sweep_stages):
                        cfg = dict(block_h=bh, block_v=bv, block_n=bn, num_warps=warps, num_stages=stages)
                        try:
                            results.append((bench(b, c, config=cfg)[1], cfg))
                        except Exception as e:  # out of shared memory / registers
                            results.append((0.0, dict(cfg, error=type(e).__name__)))
            results.sort(key=lambda r: -r[0])
            print(f"sweep batch {b} context {c}: best " + "; ".join(f"{t:.2f} TB/s {cfg}" for t, cfg in results[:3]))
            best = results[0][1] if b == 16 else best
    if args.min_split:
        best = dict(best or {}, min_split_len=args.min_split)
    run = dict(heads=args.heads, grid_len=args.grid_len, rotate=args.rotate)
    peak = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}, copy bandwidth {peak:.2f} TB/s (read + write)")
    print("| batch | context | time in a CUDA graph (us) | TB/s | % of copy | eager call (us) |")
    print("|---|---|---|---|---|---|")
    for b in args.batch:
        for c in args.context:
            eager_us, _ = bench(b, c, config=best, graph=False, **run)
            us, tbs = bench(b, c, config=best, **run)
            print(f"| {b} | {c} | {us:.1f} | {tbs:.2f} | {100 * tbs / peak:.0f}% | {eager_us:.1f} |", flush=True)


if __name__ == "__main__":
    main()
