"""The Triton kernel of v4_rope.py (imported on first use: it imports triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_quant_triton import _act_scale, _fp8_round_trip


@triton.jit
def _rounded(v, dtype: tl.constexpr):
    """float32 v rounded to `dtype`, returned as float32; bf16 to nearest-even in integer ops (Triton 3.6's
    interpreter truncates its bf16 casts, which would move the norm's factor by an ulp of the whole row)."""
    if dtype == tl.bfloat16:
        b = v.to(tl.int32, bitcast=True)
        return ((b + 0x7FFF + ((b >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return v.to(dtype).to(tl.float32)


@triton.jit
def _head_rope_kernel(x_ptr, cs_ptr, y_ptr, H, eps, stride_xt, stride_xh, stride_yt, stride_yh, stride_cst,
                      D: tl.constexpr, ROPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                      NORM: tl.constexpr, QAT_BLOCK: tl.constexpr, INVERSE: tl.constexpr):
    """One token, BLOCK_H heads of width D. Column c >= D - ROPE is in pair (c & ~1, c | 1): its partner c ^ 1 is
    loaded too (a second, cached load), so out[c] = x[c] cos - x[c+1] sin (c even) or x[c] cos + x[c-1] sin (odd)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    c = tl.arange(0, BLOCK_D)
    ok = (h < H)[:, None] & (c < D)[None, :]
    rope = c >= D - ROPE
    row = x_ptr + t * stride_xt + h[:, None] * stride_xh
    x = tl.load(row + c[None, :], mask=ok, other=0.0)
    xp = tl.load(row + (c ^ 1)[None, :], mask=ok & rope[None, :], other=0.0)
    if NORM:   # rms_unweighted: the factor in float32 rounded to x's dtype, the product rounded to it
        xf = x.to(tl.float32)
        r = _rounded(1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / D + eps), x.dtype)
        xp = _rounded(xp.to(tl.float32) * r[:, None], x.dtype)
        x = _rounded(xf * r[:, None], x.dtype)
    x, xp = x.to(tl.float32), xp.to(tl.float32)
    pair = tl.where(rope, (c - (D - ROPE)) // 2, 0)
    cos = tl.load(cs_ptr + t * stride_cst + 2 * pair, mask=rope, other=1.0)
    sin = tl.load(cs_ptr + t * stride_cst + 2 * pair + 1, mask=rope, other=0.0)
    if INVERSE:
        sin = -sin
    rotated = x * cos[None, :] + tl.where(c % 2 == 0, -1.0, 1.0)[None, :] * xp * sin[None, :]
    out = tl.where(rope[None, :], rotated, x)
    if QAT_BLOCK > 0:   # FP8 round trip with ue8m0 scales per QAT_BLOCK columns (the rotated group is not kept)
        g = tl.reshape(x, (BLOCK_H, BLOCK_D // QAT_BLOCK, QAT_BLOCK))
        q = _fp8_round_trip(g, _act_scale(tl.max(tl.abs(g), axis=2), True)[:, :, None])
        out = tl.where(rope[None, :], out, tl.reshape(q, (BLOCK_H, BLOCK_D)))
    tl.store(y_ptr + t * stride_yt + h[:, None] * stride_yh + c[None, :], out.to(y_ptr.dtype.element_ty), mask=ok)


def launch(x: torch.Tensor, cos_sin: torch.Tensor, y: torch.Tensor, rope_dim: int, eps: float | None,
           qat_block: int, inverse: bool) -> None:
    """Checked by v4_rope.head_rope; x, y: (T, H, d) contiguous."""
    T, H, d = x.shape
    block_d = max(triton.next_power_of_2(d), qat_block)
    block_h = max(1, min(triton.next_power_of_2(H), 4096 // block_d))
    _head_rope_kernel[(T, triton.cdiv(H, block_h))](
        x, cos_sin, y, H, 0.0 if eps is None else float(eps), x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        cos_sin.stride(0), D=d, ROPE=rope_dim, BLOCK_H=block_h, BLOCK_D=block_d, NORM=eps is not None,
        QAT_BLOCK=qat_block, INVERSE=inverse, num_warps=4)
