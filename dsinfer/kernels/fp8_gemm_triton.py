"""Triton FP8 block-scaled GEMM: y = (a * a_s) @ (b * b_s)^T with e4m3 operands and float32 accumulation.

a is activations quantized per token in 1x128 groups (act_quant), b a weight in 128x128 blocks. The K loop steps
one 128-wide scale group at a time: the tensor cores sum 128 products, the partial is scaled by the outer product
of the two scale vectors and added to a float32 accumulator (the DeepSeek recipe: promotion every 128).
Twin: `fp8_gemm_torch` in fp8.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import check_device, check_tensor, interpreting, m_bucket, quick_bench

SCALE_BLOCK = 128


def _configs() -> list[triton.Config]:
    """Small-M tiles stream the weight through many CTAs (decode); large-M tiles feed the tensor cores (prefill)."""
    small = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8), num_warps=4, num_stages=st)
             for bm in (32, 64) for bn in (16, 32, 64, 128) for st in (4, 6)]
    large = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8), num_warps=w, num_stages=st)
             for bm, bn, w, st in ((128, 128, 8, 4), (128, 256, 8, 3), (128, 128, 4, 4), (64, 128, 4, 4),
                                   (64, 256, 8, 4), (128, 64, 4, 4))]
    return small + large


def _prune(configs, named_args, **kwargs):
    """Small tiles whose BLOCK_M fits the bucket for M <= 64 (M <= 16 never autotunes); the large list above."""
    bucket = named_args["M_BUCKET"]
    if bucket <= 64:
        return [c for c in configs if c.kwargs["BLOCK_M"] == bucket] or configs[:1]
    return [c for c in configs if c.kwargs["BLOCK_M"] >= 64 and c.num_stages <= 4 and c.kwargs["BLOCK_N"] >= 64
            and (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) != (64, 64)]


@triton.jit
def _fp8_gemm_kernel(a_ptr, a_s_ptr, b_ptr, b_s_ptr, c_ptr,
                     M, N, K, M_BUCKET,
                     stride_am, stride_bn, stride_cm, stride_asm, stride_bsn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr):
    # Grouped tile order: GROUP_M row-tiles share each weight column-tile while it is in L2.
    pid = tl.program_id(0)
    num_pid_m, num_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows
    pid_n = (pid % group_size) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    safe_m = (offs_m % M).to(tl.int64)                                    # out-of-range rows re-read row data
    safe_n = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + safe_m[:, None] * stride_am + offs_k[None, :]         # (BLOCK_M, BLOCK_K)
    b_ptrs = b_ptr + safe_n[None, :] * stride_bn + offs_k[:, None]         # (BLOCK_K, BLOCK_N), b^T
    a_s_ptrs = a_s_ptr + safe_m * stride_asm
    b_s_ptrs = b_s_ptr + (safe_n // 128) * stride_bsn

    # Split-K (small M): program_id(1) takes one of SPLIT_K runs of K blocks and writes a float32 partial.
    k_blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_blocks, SPLIT_K)
    k_first = tl.program_id(1) * per_split
    k_last = tl.minimum(k_first + per_split, k_blocks)
    a_ptrs += k_first * BLOCK_K
    b_ptrs += k_first * BLOCK_K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(k_first, k_last):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - i * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        a_s = tl.load(a_s_ptrs + i)
        b_s = tl.load(b_s_ptrs + i)
        acc += tl.dot(a, b) * (a_s[:, None] * b_s[None, :])
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    c_ptrs = c_ptr + tl.program_id(1).to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


_fp8_gemm_tuned = triton.autotune(_configs(), key=["N", "K", "M_BUCKET"],       # SPLIT_K follows from these
                                  prune_configs_by=dict(early_config_prune=_prune),
                                  cache_results=True, do_bench=quick_bench)(_fp8_gemm_kernel)
# The interpreter cannot time configs: it runs this one.
_INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8)


CUBLAS_MIN_M = 64   # from here on cuBLAS's block-scaled FP8 GEMM beats the Triton kernel on an H100 (BENCHMARKS.md)


def _cublas_block_scaled(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor):
    """torch's block-scaled FP8 GEMM (cuBLAS, Hopper), or None where it does not apply: older torch, another
    GPU, dims it does not take (N a multiple of 128; K of 512, since cuBLAS pads the weight scales' K blocks to
    a multiple of 4), or the Triton interpreter."""
    F = torch.nn.functional
    (m, k), n = a.shape, b.shape[0]
    if (interpreting() or not hasattr(F, "scaled_mm") or m < CUBLAS_MIN_M or k % 512 or n % 128
            or torch.cuda.get_device_capability(a.device) != (9, 0)):
        return None
    from torch.nn.functional import ScalingType
    pad = -m % 4                                          # cuBLAS needs 16-byte aligned columns of the scales
    if pad:
        a = torch.cat([a, a.new_zeros(pad, k)])
        a_s = torch.cat([a_s, a_s.new_ones(pad, a_s.shape[1])])
    a_s_cm = a_s.t().contiguous().t()                     # cuBLAS wants the activation scales column-major
    c = F.scaled_mm(a, b.t(), a_s_cm, ScalingType.BlockWise1x128, b_s.t(), ScalingType.BlockWise128x128,
                    output_dtype=torch.bfloat16)
    return c[:m] if pad else c


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor) -> torch.Tensor:
    """a: (M, K) float8_e4m3fn, a_s: (M, ceil(K/128)) float32, b: (N, K) float8_e4m3fn,
    b_s: (ceil(N/128), ceil(K/128)) float32 -> (M, N) bfloat16 = (a * a_s) @ (b * b_s)^T, float32 accumulation.

    From M = 64 on an H100 with 128-multiple N and K this is cuBLAS's block-scaled GEMM (faster there; Triton's
    per-block rescaling keeps its FP8 tensor cores half idle); otherwise the Triton kernel: for M <= 16 launched
    as `small_m_config` says, above that autotuned per (N, K, M bucket) with the tuning cached on disk under
    TRITON_CACHE_DIR (~/.triton/cache)."""
    check_tensor("a", a, (torch.float8_e4m3fn,), dim=2)
    check_tensor("a_s", a_s, (torch.float32,), dim=2)
    check_tensor("b", b, (torch.float8_e4m3fn,), dim=2)
    check_tensor("b_s", b_s, (torch.float32,), dim=2)
    check_device(a=a, a_s=a_s, b=b, b_s=b_s)
    (m, k), n = a.shape, b.shape[0]
    groups = triton.cdiv(k, SCALE_BLOCK)
    if b.shape[1] != k:
        raise ValueError(f"a is (M, K) = {tuple(a.shape)} but b is (N, K) = {tuple(b.shape)}: K differs")
    if tuple(a_s.shape) != (m, groups):
        raise ValueError(f"a_s must be (M, ceil(K/128)) = {(m, groups)}, got {tuple(a_s.shape)}")
    if tuple(b_s.shape) != (triton.cdiv(n, SCALE_BLOCK), groups):
        raise ValueError(f"b_s must be (ceil(N/128), ceil(K/128)) = {(triton.cdiv(n, SCALE_BLOCK), groups)}, "
                         f"got {tuple(b_s.shape)}")
    if (c := _cublas_block_scaled(a, a_s, b, b_s)) is not None:
        return c
    c = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_()
    even_k = k % 128 == 0
    if m <= SMALL_M:
        block_n, split, warps, stages = small_m_config(m, n, k)
        out = c if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=a.device)
        grid = (triton.cdiv(n, block_n), split)
        _fp8_gemm_kernel[grid](a, a_s, b, b_s, out, m, n, k, m_bucket(m), a.stride(0), b.stride(0), n,
                               a_s.stride(0), b_s.stride(0), BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=128, GROUP_M=1,
                               EVEN_K=even_k, SPLIT_K=split, num_warps=warps, num_stages=stages)
        if split > 1:
            torch.sum(out, dim=0, out=c)    # partials in split order: the result depends on the shapes only
        return c
    args = (a, a_s, b, b_s, c, m, n, k, m_bucket(m), a.stride(0), b.stride(0), n, a_s.stride(0), b_s.stride(0))
    if interpreting():
        cfg = _INTERPRET_CONFIG
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), 1)
        _fp8_gemm_kernel[grid](*args, EVEN_K=even_k, SPLIT_K=1, **cfg)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), 1)  # noqa: E731
        _fp8_gemm_tuned[grid](*args, EVEN_K=even_k, SPLIT_K=1)
    return c


SMALL_M = 16    # up to here (decode) the launch comes from small_m_config, not the autotuner


def small_m_config(m: int, n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, SPLIT_K, num_warps, num_stages) for M <= 16, where the GEMM reads the weight once and the launch
    decides how fast: a rule fitted to `benchmarks/sweep_small_m.py` on an H100 (every DeepSeek-V3 linear, whole
    and at TP 8; within ~5% of the best configuration on each, where the autotuner's microsecond timings were
    up to 25% off). 64-wide column tiles for a few rows, 32-wide for more. K is split into runs (float32
    partials, summed in split order) when the column tiles alone give fewer than ~264 programs (two per SM) and K
    is long (> 24 blocks of 128: shorter walks gain less than the extra sum costs), up to 8 runs of >= 4 blocks."""
    block_n = 64 if m <= 8 else 32
    k_blocks = triton.cdiv(k, SCALE_BLOCK)
    split = 1
    if k_blocks > 24:
        want = triton.cdiv(264, triton.cdiv(n, block_n))
        split = max(1, min(triton.next_power_of_2(want), 8, k_blocks // 4))
    return block_n, split, 4, 4


__all__ = ["fp8_gemm", "small_m_config"]
