"""Triton weight-only FP8 GEMM for GPUs without FP8 tensor cores (A100, RTX 30xx): y = x @ (w * w_s)^T.

The e4m3 weight bytes are loaded as uint8 and decoded to bfloat16 with integer bit operations (no float8 types, so
it compiles where `tl.float8e4nv` is unsupported); products run on bf16 tensor cores with float32 accumulation and
each 128-wide K step is scaled by the weight's block scale. Twin: `fp8_weight_only_gemm_torch` in fp8.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import check_device, check_tensor, interpreting, m_bucket, quick_bench

SCALE_BLOCK = 128


@triton.jit
def e4m3_to_bf16(u):
    """Decode e4m3fn bytes (any integer tensor holding 0..255) to bfloat16, exactly.

    e4m3fn: sign | 4 exponent bits (bias 7) | 3 mantissa bits; no infinities, 0x7F/0xFF are NaN. A normal number
    moves into bfloat16 (bias 127, 7 mantissa bits) by shifting exponent+mantissa left 4 and adding 120 << 7 to the
    exponent; a subnormal (exponent 0) is mantissa * 2^-9, formed exactly in float32 whose top 16 bits are then
    the bfloat16 (its low 16 bits are zero)."""
    u = u.to(tl.int32)
    magnitude = u & 0x7F
    normal = (magnitude << 4) + (120 << 7)
    subnormal = (magnitude.to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True) >> 16   # 2^-9 * mantissa
    bits = tl.where(magnitude < 8, subnormal, tl.where(magnitude == 0x7F, 0x7FC0, normal))
    return (((u & 0x80) << 8) | bits).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _e4m3_decode_kernel(u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """Decode n bytes (for testing e4m3_to_bf16 on every byte value)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, e4m3_to_bf16(tl.load(u_ptr + offs, mask=offs < n, other=0)), mask=offs < n)


def _configs() -> list[triton.Config]:
    small = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8), num_warps=4, num_stages=st)
             for bm in (16, 32, 64) for bn in (32, 64, 128) for st in (3, 5)]
    large = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8), num_warps=w, num_stages=st)
             for bm, bn, w, st in ((128, 128, 8, 3), (128, 256, 8, 3), (128, 128, 4, 3), (64, 128, 4, 4))]
    return small + large


def _prune(configs, named_args, **kwargs):
    bucket = named_args["M_BUCKET"]
    if bucket <= 64:
        return [c for c in configs if c.kwargs["BLOCK_M"] == bucket] or configs[:1]
    return configs[-4:]


@triton.jit
def _weight_only_kernel(x_ptr, w_ptr, w_s_ptr, c_ptr,
                        M, N, K, M_BUCKET,
                        stride_xm, stride_wn, stride_cm, stride_wsn,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                        EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr):
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
    safe_m = (offs_m % M).to(tl.int64)
    safe_n = (offs_n % N).to(tl.int64)
    x_ptrs = x_ptr + safe_m[:, None] * stride_xm + offs_k[None, :]         # (BLOCK_M, BLOCK_K) bf16
    w_ptrs = w_ptr + safe_n[None, :] * stride_wn + offs_k[:, None]         # (BLOCK_K, BLOCK_N) bytes, w^T
    w_s_ptrs = w_s_ptr + (safe_n // 128) * stride_wsn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_left = K - i * BLOCK_K
            x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0)
        w_s = tl.load(w_s_ptrs + i)
        w = e4m3_to_bf16(w)
        if DOT_FP32:   # Triton 3.6's interpreter multiplies bf16 as raw uint16 bits: give it exact float32
            partial = tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            partial = tl.dot(x, w)
        acc += partial * w_s[None, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


_weight_only_tuned = triton.autotune(_configs(), key=["N", "K", "M_BUCKET"],
                                     prune_configs_by=dict(early_config_prune=_prune),
                                     cache_results=True, do_bench=quick_bench)(_weight_only_kernel)
_INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8)


def e4m3_decode(u: torch.Tensor) -> torch.Tensor:
    """u: (n,) uint8 e4m3fn bytes -> (n,) bfloat16, through the kernel's bit decoder (a test hook)."""
    check_tensor("u", u, (torch.uint8,), dim=1)
    check_device(u=u)
    y = torch.empty(u.shape, dtype=torch.bfloat16, device=u.device)
    _e4m3_decode_kernel[(triton.cdiv(u.numel(), 256),)](u, y, u.numel(), BLOCK=256)
    return y


def fp8_weight_only_gemm(x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor) -> torch.Tensor:
    """x: (M, K) bfloat16, w: (N, K) float8_e4m3fn (or its bytes as uint8), w_s: (ceil(N/128), ceil(K/128)) float32
    -> (M, N) bfloat16 = x @ (w * w_s)^T with float32 accumulation; needs no FP8 hardware."""
    check_tensor("x", x, (torch.bfloat16,), dim=2)
    check_tensor("w", w, (torch.float8_e4m3fn, torch.uint8), dim=2)
    check_tensor("w_s", w_s, (torch.float32,), dim=2)
    check_device(x=x, w=w, w_s=w_s)
    (m, k), n = x.shape, w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f"x is (M, K) = {tuple(x.shape)} but w is (N, K) = {tuple(w.shape)}: K differs")
    want = (triton.cdiv(n, SCALE_BLOCK), triton.cdiv(k, SCALE_BLOCK))
    if tuple(w_s.shape) != want:
        raise ValueError(f"w_s must be (ceil(N/128), ceil(K/128)) = {want}, got {tuple(w_s.shape)}")
    c = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_()
    wb = w.view(torch.uint8)
    args = (x, wb, w_s, c, m, n, k, m_bucket(m), x.stride(0), wb.stride(0), c.stride(0), w_s.stride(0))
    even_k = k % 128 == 0
    if interpreting():
        cfg = _INTERPRET_CONFIG
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _weight_only_kernel[grid](*args, EVEN_K=even_k, DOT_FP32=True, **cfg)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _weight_only_tuned[grid](*args, EVEN_K=even_k, DOT_FP32=False)
    return c


__all__ = ["fp8_weight_only_gemm", "e4m3_decode", "e4m3_to_bf16"]
