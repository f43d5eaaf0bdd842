"""The Triton kernel of v4_indexer.py (imported on first use: it imports triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import interpreting


@triton.jit
def _indexer_scores_kernel(
    # pointers
    q_ptr, k_ptr, rows_ptr, w_ptr, pos_ptr, out_ptr,
    # sizes
    H, N, D, ratio,
    # strides (elements)
    stride_qs, stride_qh, stride_kn, stride_rs, stride_ws, stride_os,
    # constexprs
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    ROWS: tl.constexpr,
):
    # ROWS: query s's entry t is keys[rows[s, t]] (each query has its own entries, e.g. a batch of sequences whose
    # entries lie in pages); otherwise entry t is keys[t] for every query
    s = tl.program_id(0).to(tl.int64)              # the query row; int64 so s * stride_os cannot overflow
    n0 = tl.program_id(1) * BLOCK_N
    ts = n0 + tl.arange(0, BLOCK_N)                # the key block's entries
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < D
    # the query sees entries t < (position + 1) // ratio (positions are >= 0, so C division equals floor division
    # wherever it matters: a negative limit and a zero one both hide every entry)
    limit = (tl.load(pos_ptr + s) + 1) // ratio
    visible = (ts < limit) & (ts < N)
    acc = tl.zeros((BLOCK_N,), tl.float32)        # I[s, block] = sum_h w[s, h] * relu(q_h . K_t)
    if n0 < limit:                                 # a block wholly past the visible prefix is not computed
        # the key block, transposed: (BLOCK_D, BLOCK_N); hidden entries and padded dims read as 0 (and not read)
        if ROWS:
            key_rows = tl.load(rows_ptr + s * stride_rs + ts, mask=visible, other=0).to(tl.int64)
        else:
            key_rows = ts.to(tl.int64)
        kT = tl.load(k_ptr + key_rows[None, :] * stride_kn + dims[:, None], mask=d_ok[:, None] & visible[None, :],
                     other=0.0)
        for h0 in range(0, H, BLOCK_H):
            heads = h0 + tl.arange(0, BLOCK_H)
            h_ok = heads < H
            # this block of heads' queries (BLOCK_H, BLOCK_D) and weights (BLOCK_H,); padded heads get w = 0
            q = tl.load(q_ptr + s * stride_qs + heads[:, None] * stride_qh + dims[None, :],
                        mask=h_ok[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(w_ptr + s * stride_ws + heads, mask=h_ok, other=0.0)
            # per-head logits q_h . K_t, accumulated in float32: (BLOCK_H, BLOCK_N)
            if IEEE:       # float32 dot, exact products (the GPU default would round float32 inputs to TF32)
                logits = tl.dot(q.to(tl.float32), kT.to(tl.float32), input_precision="ieee")
            else:          # bf16 / fp16: products are exact in float32 anyway
                logits = tl.dot(q, kT).to(tl.float32)
            # relu per head, weight by w[s, h], sum over the heads
            acc += tl.sum(tl.maximum(logits, 0.0) * w[:, None], axis=0)
    # hidden entries score -inf, so top-k takes them last
    tl.store(out_ptr + s * stride_os + ts, tl.where(visible, acc, float("-inf")), mask=ts < N)


def launch(q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor, positions: torch.Tensor, ratio: int,
           out: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Checked by v4_indexer.indexer_scores (or indexer_scores_rows, with rows (S, n)); writes out (S, n) float32."""
    S, H, D = q.shape
    N = out.shape[1]
    BLOCK_H = max(16, min(64, triton.next_power_of_2(H)))   # tl.dot needs at least 16 rows; padded heads masked
    BLOCK_N = 64
    BLOCK_D = max(16, triton.next_power_of_2(D))            # one block holds a whole head (d = 128 in V4)
    # a float32 dot for float32 inputs, and for any under the interpreter: Triton 3.6's interpreter multiplies bf16
    # as raw uint16 bits; bf16 and fp16 products are exact in float32, so this changes nothing but the speed
    ieee = q.dtype == torch.float32 or interpreting()
    grid = (S, triton.cdiv(N, BLOCK_N))
    _indexer_scores_kernel[grid](
        q, keys, keys if rows is None else rows, w, positions, out,
        H, N, D, ratio,
        q.stride(0), q.stride(1), keys.stride(0), 0 if rows is None else rows.stride(0), w.stride(0), out.stride(0),
        BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, IEEE=ieee, ROWS=rows is not None,
        num_warps=4 if BLOCK_D <= 128 else 8)
