"""Small fused kernels for the per-token path of every layer: RMSNorm (optionally after the residual add) and
the interleaved rotary embedding.

In PyTorch each is six to eight elementwise launches (casts, square, mean, rsqrt, products); at decode batch
sizes launches, not bytes, are their cost, so each becomes one launch here. Twins: `RMSNorm.forward`'s float32
formula (`norm_rope.rms_norm_torch`, `add_rms_norm_torch`) and `norm_rope.rotate_pairs_torch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .norm_rope import rms_norm_torch
from .triton_common import check_device


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, D, stride_x, stride_y, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, 0) / D + eps) * w
    tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., D) with a contiguous last dim; weight: (D,) -> (..., D) in x's dtype, float32 math."""
    check_device(x=x, weight=weight)
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(D)
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, D, x2.stride(0), y.stride(0), eps, BLOCK=block,
                                         num_warps=max(1, min(8, block // 256)))
    return y.view(x.shape)


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, D, stride_x, stride_r, stride_y, stride_s, eps,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0)
    h = (x.to(tl.float32) + r.to(tl.float32)).to(s_ptr.dtype.element_ty)      # the residual stream, rounded
    tl.store(s_ptr + row * stride_s + offs, h, mask=mask)
    hf = h.to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = hf * tl.rsqrt(tl.sum(hf * hf, 0) / D + eps) * w
    tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: (T, D) of one dtype, contiguous last dims; weight: (D,) -> (rms_norm(x + residual), x +
    residual): the sum rounded to the dtype once, as the unfused `x + residual` is, and normalised from that."""
    check_device(x=x, residual=residual, weight=weight)
    if x.shape != residual.shape or x.dtype != residual.dtype or x.dim() != 2:
        raise ValueError(f"x and residual must be (T, D) of one dtype, got {tuple(x.shape)} {x.dtype} and "
                         f"{tuple(residual.shape)} {residual.dtype}")
    x, residual = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, residual))
    T, D = x.shape
    y, s = torch.empty_like(x), torch.empty_like(x)
    if T:
        block = triton.next_power_of_2(D)
        _add_rms_norm_kernel[(T,)](x, residual, weight, y, s, D, x.stride(0), residual.stride(0), y.stride(0),
                                   s.stride(0), eps, BLOCK=block, num_warps=max(1, min(8, block // 256)))
    return y, s


def add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + residual
    return rms_norm_torch(h, weight, eps), h


@triton.jit
def _rotary_kernel(x_ptr, cs_ptr, y_ptr, H, stride_xt, stride_xh, stride_yt, stride_yh, stride_cst,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One token, BLOCK_H of its heads: pairs (x[2i], x[2i+1]) rotated by the angle of pair i."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < H) & (i[None, :] < HALF)
    cos = tl.load(cs_ptr + t * stride_cst + 2 * i, mask=i < HALF, other=0.0)[None, :]
    sin = tl.load(cs_ptr + t * stride_cst + 2 * i + 1, mask=i < HALF, other=0.0)[None, :]
    src = x_ptr + t * stride_xt + h[:, None] * stride_xh + 2 * i[None, :]
    x0 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
    dst = y_ptr + t * stride_yt + h[:, None] * stride_yh + 2 * i[None, :]
    tl.store(dst, (x0 * cos - x1 * sin).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + 1, (x0 * sin + x1 * cos).to(y_ptr.dtype.element_ty), mask=mask)


def rotary(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x: (T, d) or (T, H, d), last dim contiguous, any float dtype; cos_sin: (T, d/2, 2) float32 contiguous
    -> a new tensor like x (contiguous) with interleaved pairs rotated."""
    check_device(x=x, cos_sin=cos_sin)
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    T, H, d = x3.shape
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    y = torch.empty((T, H, d), dtype=x.dtype, device=x.device)
    if T:
        block_h = min(triton.next_power_of_2(H), 16)      # 16 heads a program: 128 heads are 8 programs, not 1
        _rotary_kernel[(T, triton.cdiv(H, block_h))](x3, cos_sin, y, H, x3.stride(0), x3.stride(1), y.stride(0),
                                                     y.stride(1), cos_sin.stride(0), HALF=d // 2, BLOCK_H=block_h,
                                                     BLOCK_D=triton.next_power_of_2(d // 2), num_warps=1)
    return y.view(x.shape)
