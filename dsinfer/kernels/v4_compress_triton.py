"""The Triton kernel of v4_compress.py (imported on first use: it imports triton).

One program per entry holds the whole row of d channels (d <= 512 in the model) as two vectors, the even
channels 2p and the odd channels 2p + 1 of pair p, so the rotary step pairs them without a shuffle and the RMS
statistic needs no second launch. The softmax over slots is two-pass per channel (max, then the sums) rather
than online: with overlap the first half of an entry's slots may be all -inf, and an online max that starts
there would give exp(-inf - -inf) = nan.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 2048          # elements of one (BLOCK_S, BLOCK_P) tile; four such tiles are live in the second pass


@triton.jit
def _round(x, dtype: tl.constexpr):
    """float32 x rounded to `dtype` (nearest, ties to even) and back to float32. bfloat16 by bit arithmetic:
    Triton's interpreter truncates float32 -> bfloat16 casts (3.6), so the cast is not used, on GPU either."""
    if dtype == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16      # + 0x7FFF, + 1 if the kept last bit is odd, cut
        return u.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _compress_pool_kernel(
    # pointers
    kv_ptr, score_ptr, w_ptr, cs_ptr, out_ptr,
    # sizes
    SLOTS, D, ROT_START, eps,
    # strides (elements); score is contiguous with kv's shape, so it shares kv's strides
    stride_n, stride_s, stride_csn, stride_on,
    # constexprs
    BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, BLOCK_P)                        # pair p: channels 2p (suffix 0) and 2p + 1 (suffix 1)
    p_ok = p < D // 2
    ch = 2 * p
    kv_row = kv_ptr + t * stride_n
    score_row = score_ptr + t * stride_n

    # pass 1: the per-channel max over the slots (padded slots read -inf)
    m0 = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    m1 = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    for s0 in range(0, SLOTS, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < SLOTS)[:, None] & p_ok[None, :]
        offs = s[:, None] * stride_s + ch[None, :]                                  # (BLOCK_S, BLOCK_P)
        m0 = tl.maximum(m0, tl.max(tl.load(score_row + offs, mask=mask, other=float("-inf")), axis=0))
        m1 = tl.maximum(m1, tl.max(tl.load(score_row + offs + 1, mask=mask, other=float("-inf")), axis=0))
    # padded channels: a finite max, so their exp() below is 0 rather than nan (no real column is all -inf)
    m0 = tl.where(p_ok, m0, 0.0)
    m1 = tl.where(p_ok, m1, 0.0)

    # pass 2: the softmax denominator and the weighted sum of kv, both with exp(score - max); -inf slots give 0
    l0 = tl.zeros((BLOCK_P,), tl.float32)
    l1 = tl.zeros((BLOCK_P,), tl.float32)
    acc0 = tl.zeros((BLOCK_P,), tl.float32)
    acc1 = tl.zeros((BLOCK_P,), tl.float32)
    for s0 in range(0, SLOTS, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < SLOTS)[:, None] & p_ok[None, :]
        offs = s[:, None] * stride_s + ch[None, :]
        e0 = tl.exp(tl.load(score_row + offs, mask=mask, other=float("-inf")) - m0[None, :])
        e1 = tl.exp(tl.load(score_row + offs + 1, mask=mask, other=float("-inf")) - m1[None, :])
        acc0 += tl.sum(tl.load(kv_row + offs, mask=mask, other=0.0) * e0, axis=0)
        acc1 += tl.sum(tl.load(kv_row + offs + 1, mask=mask, other=0.0) * e1, axis=0)
        l0 += tl.sum(e0, axis=0)
        l1 += tl.sum(e1, axis=0)
    # pooled, rounded to the output dtype and back (the model's `pooled.to(x.dtype)`); padded channels 0 / 1 = 0
    x0 = _round(acc0 / tl.where(p_ok, l0, 1.0), out_ptr.dtype.element_ty)
    x1 = _round(acc1 / tl.where(p_ok, l1, 1.0), out_ptr.dtype.element_ty)

    # RMSNorm in float32, weight included, rounded once (rsqrt as the model's CUDA rms_norm kernel takes it)
    r = tl.rsqrt((tl.sum(x0 * x0, axis=0) + tl.sum(x1 * x1, axis=0)) / D + eps)
    w0 = tl.load(w_ptr + ch, mask=p_ok, other=0.0)
    w1 = tl.load(w_ptr + ch + 1, mask=p_ok, other=0.0)
    y0 = _round(x0 * r * w0, out_ptr.dtype.element_ty)
    y1 = _round(x1 * r * w1, out_ptr.dtype.element_ty)

    # rotary on the last rd channels (pairs ROT_START..): rope pair i = p - ROT_START, computed in float32 from
    # the rounded normed values, as apply_rotary does; the other channels pass through
    rot = p_ok & (p >= ROT_START)
    i = tl.where(rot, p - ROT_START, 0)
    cos = tl.load(cs_ptr + t * stride_csn + 2 * i, mask=rot, other=1.0)
    sin = tl.load(cs_ptr + t * stride_csn + 2 * i + 1, mask=rot, other=0.0)
    z0 = tl.where(rot, y0 * cos - y1 * sin, y0)
    z1 = tl.where(rot, y0 * sin + y1 * cos, y1)

    # round the rotated channels (the others already are), then store: every value is representable, so the
    # cast is exact
    out_row = out_ptr + t * stride_on
    tl.store(out_row + ch, _round(z0, out_ptr.dtype.element_ty).to(out_ptr.dtype.element_ty), mask=p_ok)
    tl.store(out_row + ch + 1, _round(z1, out_ptr.dtype.element_ty).to(out_ptr.dtype.element_ty), mask=p_ok)


def launch(kv: torch.Tensor, score: torch.Tensor, norm_weight: torch.Tensor, cos_sin: torch.Tensor, eps: float,
           out: torch.Tensor) -> None:
    """Checked by v4_compress.compress_pool; writes out (n, d)."""
    n, slots, d = kv.shape
    rd = 2 * cos_sin.shape[1]
    BLOCK_P = triton.next_power_of_2(d // 2)
    BLOCK_S = min(triton.next_power_of_2(slots), max(1, TILE // BLOCK_P))
    _compress_pool_kernel[(n,)](
        kv, score, norm_weight, cos_sin, out,
        slots, d, (d - rd) // 2, eps,
        kv.stride(0), kv.stride(1), cos_sin.stride(0), out.stride(0),
        BLOCK_S=BLOCK_S, BLOCK_P=BLOCK_P, num_warps=4 if d > 128 else 2)
