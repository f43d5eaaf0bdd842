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

from .fp8_quant_triton import _act_scale, _fp8_round_trip, _pow2_ceil

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
def _load_slots(a_ptr, stride_a, b_ptr, stride_b, s, ch, mask, other, SPLIT: tl.constexpr, a_ok):
    """(BLOCK_S, BLOCK_P) values of slots s at channels ch: slots below SPLIT from a (rows s; none where not a_ok:
    `other`), the rest from b (rows s - SPLIT)."""
    vb = tl.load(b_ptr + (s - SPLIT)[:, None] * stride_b + ch[None, :], mask=mask & (s >= SPLIT)[:, None],
                 other=other)
    if SPLIT > 0:
        va = tl.load(a_ptr + s[:, None] * stride_a + ch[None, :], mask=mask & (s < SPLIT)[:, None] & a_ok,
                     other=other)
        vb = tl.where((s < SPLIT)[:, None], va, vb)
    return vb


@triton.jit
def _pool_row(kv_a, score_a, stride_a, kv_b, score_b, stride_b, a_ok, w_ptr, cs_row, out_row, SLOTS, D, ROT_START,
              eps, SPLIT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr):
    """One entry: its SLOTS slots (the first SPLIT from kv_a / score_a, unless not a_ok: kv 0, score -inf; the rest
    from kv_b / score_b) pooled, normalised, rotated and stored at out_row."""
    p = tl.arange(0, BLOCK_P)                        # pair p: channels 2p (suffix 0) and 2p + 1 (suffix 1)
    p_ok = p < D // 2
    ch = 2 * p
    ninf = float("-inf")

    # pass 1: the per-channel max over the slots (padded slots read -inf)
    m0 = tl.full((BLOCK_P,), ninf, tl.float32)
    m1 = tl.full((BLOCK_P,), ninf, tl.float32)
    for s0 in range(0, SLOTS, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < SLOTS)[:, None] & p_ok[None, :]
        m0 = tl.maximum(m0, tl.max(_load_slots(score_a, stride_a, score_b, stride_b, s, ch, mask, ninf, SPLIT, a_ok),
                                   axis=0))
        m1 = tl.maximum(m1, tl.max(_load_slots(score_a + 1, stride_a, score_b + 1, stride_b, s, ch, mask, ninf,
                                               SPLIT, a_ok), axis=0))
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
        e0 = tl.exp(_load_slots(score_a, stride_a, score_b, stride_b, s, ch, mask, ninf, SPLIT, a_ok) - m0[None, :])
        e1 = tl.exp(_load_slots(score_a + 1, stride_a, score_b + 1, stride_b, s, ch, mask, ninf, SPLIT, a_ok)
                    - m1[None, :])
        acc0 += tl.sum(_load_slots(kv_a, stride_a, kv_b, stride_b, s, ch, mask, 0.0, SPLIT, a_ok) * e0, axis=0)
        acc1 += tl.sum(_load_slots(kv_a + 1, stride_a, kv_b + 1, stride_b, s, ch, mask, 0.0, SPLIT, a_ok) * e1,
                       axis=0)
        l0 += tl.sum(e0, axis=0)
        l1 += tl.sum(e1, axis=0)
    # pooled, rounded to the output dtype and back (the model's `pooled.to(x.dtype)`); padded channels 0 / 1 = 0
    x0 = _round(acc0 / tl.where(p_ok, l0, 1.0), out_row.dtype.element_ty)
    x1 = _round(acc1 / tl.where(p_ok, l1, 1.0), out_row.dtype.element_ty)

    # RMSNorm in float32, weight included, rounded once (rsqrt as the model's CUDA rms_norm kernel takes it)
    r = tl.rsqrt((tl.sum(x0 * x0, axis=0) + tl.sum(x1 * x1, axis=0)) / D + eps)
    w0 = tl.load(w_ptr + ch, mask=p_ok, other=0.0)
    w1 = tl.load(w_ptr + ch + 1, mask=p_ok, other=0.0)
    y0 = _round(x0 * r * w0, out_row.dtype.element_ty)
    y1 = _round(x1 * r * w1, out_row.dtype.element_ty)

    # rotary on the last rd channels (pairs ROT_START..): rope pair i = p - ROT_START, computed in float32 from
    # the rounded normed values, as apply_rotary does; the other channels pass through
    rot = p_ok & (p >= ROT_START)
    i = tl.where(rot, p - ROT_START, 0)
    cos = tl.load(cs_row + 2 * i, mask=rot, other=1.0)
    sin = tl.load(cs_row + 2 * i + 1, mask=rot, other=0.0)
    z0 = tl.where(rot, y0 * cos - y1 * sin, y0)
    z1 = tl.where(rot, y0 * sin + y1 * cos, y1)

    # round the rotated channels (the others already are), then store: every value is representable, so the
    # cast is exact
    tl.store(out_row + ch, _round(z0, out_row.dtype.element_ty).to(out_row.dtype.element_ty), mask=p_ok)
    tl.store(out_row + ch + 1, _round(z1, out_row.dtype.element_ty).to(out_row.dtype.element_ty), mask=p_ok)


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
    kv_row, score_row = kv_ptr + t * stride_n, score_ptr + t * stride_n
    _pool_row(kv_row, score_row, stride_s, kv_row, score_row, stride_s, True, w_ptr, cs_ptr + t * stride_csn,
              out_ptr + t * stride_on, SLOTS, D, ROT_START, eps, 0, BLOCK_S, BLOCK_P)


@triton.jit
def _hadamard(v, D: tl.constexpr, LOG2D: tl.constexpr):
    """The orthonormal Walsh-Hadamard transform of a (D,) float32 vector by butterflies, in the twin's order:
    level h pairs (a, b) = (v[i], v[i + h]) within blocks of 2h into (a + b, a - b); then times D^-1/2. The pair's
    halves are picked and put back by multiplying with 1 and 0 and summing (exact), with reshapes only."""
    for level in tl.static_range(LOG2D):
        x = tl.reshape(v, (D >> (level + 1), 2, 1 << level))
        first = (tl.arange(0, 2) == 0).to(tl.float32)[None, :, None]                  # (1, 2, 1): 1, 0
        a = tl.sum(x * first, axis=1)
        b = tl.sum(x * (1.0 - first), axis=1)
        v = tl.reshape((a + b)[:, None, :] * first + (a - b)[:, None, :] * (1.0 - first), (D,))
    return v * (D ** -0.5)


@triton.jit
def _fp4_round_trip(v, D: tl.constexpr):
    """The reference's FP4 round trip per 32 values: s = 2^ceil(log2(max(amax, 6 * 2^-126) / 6)), v -> e2m1(clamp(v /
    s, -6, 6)) * s, the e2m1 rounding to nearest, ties to the even code."""
    g = tl.reshape(v, (D // 32, 32))
    s = _pow2_ceil(tl.math.div_rn(tl.maximum(tl.max(tl.abs(g), axis=1), 6.0 * 2.0 ** -126), 6.0))
    q = tl.clamp(tl.math.div_rn(g, s[:, None]), -6.0, 6.0)
    a = tl.abs(q)
    step = tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))          # the e2m1 grid's spacing around a
    r = tl.minimum(((a * (1.0 / step) + 12582912.0) - 12582912.0) * step, 6.0)   # 1.5 * 2^23: round half to even
    return tl.reshape(tl.where(q < 0, -r, r) * s[:, None], (D,))


@triton.jit
def _compress_decode_kernel(
    kv_ptr, score_ptr, ape_ptr, pos_ptr, slot_ptr, kvbuf_ptr, scorebuf_ptr, prevkv_ptr, prevscore_ptr, w_ptr,
    cs_ptr, ent_ptr, erow_ptr, eps,
    stride_x, stride_bs, stride_ps, stride_cs, stride_er, stride_e,
    M: tl.constexpr, D: tl.constexpr, RD: tl.constexpr, WIDTH: tl.constexpr, OVERLAP: tl.constexpr,
    ROTATE: tl.constexpr, QAT: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr, LOG2D: tl.constexpr, QAT_BLOCK: tl.constexpr,
):
    """One row b: buffer its token; if it completes a window, pool, finish and store the entry (and with OVERLAP
    keep this window's first halves). Buffers are (slots, M, WIDTH), prev (slots, M, D): rows of WIDTH / D."""
    b = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + b)
    slot = tl.load(slot_ptr + b)
    at = pos % M
    c = tl.arange(0, BLOCK_W)
    c_ok = c < WIDTH
    kv = tl.load(kv_ptr + b * stride_x + c, mask=c_ok)
    score = tl.load(score_ptr + b * stride_x + c, mask=c_ok) + tl.load(ape_ptr + at * WIDTH + c, mask=c_ok)
    kv_win, score_win = kvbuf_ptr + slot * stride_bs, scorebuf_ptr + slot * stride_bs
    tl.store(kv_win + at * WIDTH + c, kv, mask=c_ok)
    tl.store(score_win + at * WIDTH + c, score, mask=c_ok)
    if (pos + 1) % M != 0:
        return
    tl.debug_barrier()                                  # the window's rows, this one included, are all written

    out_row = ent_ptr + tl.load(erow_ptr + b * stride_er + pos // M) * stride_e
    cs_row = cs_ptr + (pos // M * M) * stride_cs
    if OVERLAP:     # slots: the previous window's first halves (none in window 0), then this window's second
        prev_kv, prev_score = prevkv_ptr + slot * stride_ps, prevscore_ptr + slot * stride_ps
        _pool_row(prev_kv, prev_score, D, kv_win + D, score_win + D, WIDTH, pos >= M, w_ptr, cs_row, out_row,
                  2 * M, D, (D - RD) // 2, eps, M, BLOCK_S, BLOCK_P)
        tl.debug_barrier()                              # prev is read: this window's first halves take its place
        r = tl.arange(0, M)
        d = tl.arange(0, BLOCK_D)
        ok = (d < D)[None, :]
        src = r[:, None] * WIDTH + d[None, :]
        dst = r[:, None] * D + d[None, :]
        tl.store(prev_kv + dst, tl.load(kv_win + src, mask=ok), mask=ok)
        tl.store(prev_score + dst, tl.load(score_win + src, mask=ok), mask=ok)
    else:
        _pool_row(kv_win, score_win, WIDTH, kv_win, score_win, WIDTH, True, w_ptr, cs_row, out_row, M, D,
                  (D - RD) // 2, eps, 0, BLOCK_S, BLOCK_P)
    if ROTATE or QAT:
        tl.debug_barrier()                              # the pooled entry is stored: finish it in place
        d = tl.arange(0, BLOCK_D)
        v = tl.load(out_row + d, mask=d < D, other=0.0).to(tl.float32)
        if ROTATE:
            v = _round(_hadamard(v, BLOCK_D, LOG2D), out_row.dtype.element_ty)
            if QAT:
                v = _fp4_round_trip(v, BLOCK_D)
        else:           # FP8 round trip with ue8m0 scales per QAT_BLOCK of the non-rotary dims
            g = tl.reshape(v, (BLOCK_D // QAT_BLOCK, QAT_BLOCK))
            q = _fp8_round_trip(g, _act_scale(tl.max(tl.abs(g), axis=1), True)[:, None])
            v = tl.where(d < D - RD, tl.reshape(q, (BLOCK_D,)), v)
        tl.store(out_row + d, _round(v, out_row.dtype.element_ty).to(out_row.dtype.element_ty), mask=d < D)


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


def launch_decode(kv, score, ape, positions, slots, kv_buf, score_buf, prev_kv, prev_score, norm_weight, rope_table,
                  entries, entry_rows, eps: float, rotate: bool, qat: bool) -> None:
    """Checked by v4_compress.compress_decode."""
    B, width = kv.shape
    m, d, rd = kv_buf.shape[1], norm_weight.shape[0], 2 * rope_table.shape[1]
    overlap = prev_kv is not None
    slots_total = 2 * m if overlap else m
    BLOCK_P = triton.next_power_of_2(d // 2)
    block_d = triton.next_power_of_2(d)
    _compress_decode_kernel[(B,)](
        kv, score, ape, positions, slots, kv_buf, score_buf, prev_kv if overlap else kv_buf,
        prev_score if overlap else score_buf, norm_weight, rope_table, entries, entry_rows, eps,
        kv.stride(0), kv_buf.stride(0), prev_kv.stride(0) if overlap else 0, rope_table.stride(0),
        entry_rows.stride(0), entries.stride(0),
        M=m, D=d, RD=rd, WIDTH=width, OVERLAP=overlap, ROTATE=rotate, QAT=qat,
        BLOCK_W=triton.next_power_of_2(width), BLOCK_S=min(triton.next_power_of_2(slots_total),
                                                          max(1, TILE // BLOCK_P)),
        BLOCK_P=BLOCK_P, BLOCK_D=block_d, LOG2D=block_d.bit_length() - 1, QAT_BLOCK=min(64, block_d),
        num_warps=4 if d > 128 else 2)
