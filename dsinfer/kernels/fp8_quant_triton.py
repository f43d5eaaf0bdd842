"""Triton FP8 quantization kernels: per-token activation quantization (act_quant) and block-scaled weight
dequantization (weight_dequant). Twins: `act_quant_torch`, `weight_dequant_torch` in fp8.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import SCALE_FMTS, check_block_scale
from .triton_common import check_device, check_tensor

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _round_to_e4m3(v):
    """Round float32 v (|v| <= 448) to the nearest e4m3 value, ties to even, in float32: adding c = 1.5 * 2^(e + 20)
    (e: v's exponent, at least -6, as subnormals share the 2^-9 step) leaves the sum's last bit at v's e4m3 step
    2^(e - 3), so the float addition rounds v to the grid, and subtracting c again is exact; values that round to
    zero keep their sign, as the cast keeps it.

    The cast to float8e4nv rounds the same way on the GPU, but Triton 3.6's interpreter drops the carry when
    rounding crosses a power of two (1.97 -> 1.0); a value already on the e4m3 grid casts exactly everywhere."""
    bits = v.to(tl.int32, bitcast=True)
    exponent = tl.maximum(bits & 0x7F800000, 121 << 23)                             # 2^e's bits, e >= -6
    c = (exponent + ((20 << 23) | 0x400000)).to(tl.float32, bitcast=True)          # 1.5 * 2^(e + 20)
    r = ((v + c) - c).to(tl.int32, bitcast=True) | (bits & -2 ** 31)               # the sign kept at zero (-0.0)
    return r.to(tl.float32, bitcast=True)


@triton.jit
def _pow2_ceil(s):
    """Positive float32 s -> the smallest power of two >= s (the ue8m0 scale format): any mantissa bit carries into
    the exponent."""
    return ((s.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)


@triton.jit
def _act_scale(amax, UE8M0: tl.constexpr):
    """act_quant's scale of a group from its amax: max(amax, 1e-4) / 448, by IEEE division (a plain `/` compiles to
    an approximate one on the GPU), rounded up to a power of two with UE8M0."""
    s = tl.math.div_rn(tl.maximum(amax, 1e-4), 448.0)
    if UE8M0:
        s = _pow2_ceil(s)
    return s


@triton.jit
def _fp8_round_trip(x, s):
    """x -> e4m3(clamp(x / s, -448, 448)) * s in float32, s broadcast against x: the QAT simulation's FP8 rounding."""
    return _round_to_e4m3(tl.clamp(tl.math.div_rn(x, s), -448.0, 448.0)) * s


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr,
                      K,
                      stride_xm, stride_qm, stride_sm,
                      BLOCK: tl.constexpr, UE8M0: tl.constexpr):
    row, group = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs = group * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    s = _act_scale(tl.max(tl.abs(x)), UE8M0)
    q = _round_to_e4m3(tl.clamp(tl.math.div_rn(x, s), -448.0, 448.0))
    tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_sm + group, s)


def act_quant(x: torch.Tensor, block_size: int = 128,
              scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (..., K) bf16/fp16/fp32 -> q: (..., K) float8_e4m3fn, s: (..., ceil(K/block_size)) float32.

    Per-token groups of `block_size` along K (the last may be partial); s = max(amax, 1e-4) / 448, a power of two
    rounded up with scale_fmt="ue8m0"; q = clamp(x / s, -448, 448)."""
    check_tensor("x", x, FLOAT_DTYPES)
    check_device(x=x)
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"unknown scale_fmt {scale_fmt!r}; choose None or 'ue8m0'")
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    k = x.shape[-1]
    groups = triton.cdiv(k, block_size)
    x2 = x.view(-1, k)                                                    # (M, K)
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(*x.shape[:-1], groups, dtype=torch.float32, device=x.device)
    if x2.shape[0]:
        _act_quant_kernel[(x2.shape[0], groups)](x2, q, s, k, x2.stride(0), k, groups,
                                                 BLOCK=block_size, UE8M0=scale_fmt == "ue8m0", num_warps=1)
    return q, s


@triton.jit
def _weight_dequant_kernel(w_ptr, s_ptr, y_ptr,
                           N, K,
                           stride_sn,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + pid_n * stride_sn + pid_k)
    tl.store(y_ptr + offs_n[:, None] * K + offs_k[None, :], (w * s).to(y_ptr.dtype.element_ty), mask=mask)


def weight_dequant(w: torch.Tensor, s: torch.Tensor, block_size: int | tuple[int, int] = 128,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """w: (N, K) float8_e4m3fn, s: (ceil(N/bn), ceil(K/bk)) float32 -> (N, K) `dtype`; edge blocks may be partial."""
    bn, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    check_tensor("w", w, (torch.float8_e4m3fn,), dim=2)
    check_tensor("s", s, (torch.float32,), dim=2)
    check_device(w=w, s=s)
    check_block_scale(w, s, (bn, bk))
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of bfloat16, float16, float32; got {dtype}")
    for b in (bn, bk):
        if b < 16 or b & (b - 1):
            raise ValueError(f"block sizes must be powers of two >= 16, got {(bn, bk)}")
    n, k = w.shape
    y = torch.empty(n, k, dtype=dtype, device=w.device)
    if w.numel():
        _weight_dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](w, s, y, n, k, s.stride(0),
                                                                        BLOCK_N=bn, BLOCK_K=bk, num_warps=8)
    return y


__all__ = ["act_quant", "weight_dequant"]
