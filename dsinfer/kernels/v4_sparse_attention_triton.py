"""The Triton kernel of v4_sparse_attention.py (imported on first use: it imports triton).

A program holds BLOCK_H heads of one token and walks its K indices with an online softmax that starts from the
sink. When there are too few (token, head block) programs to fill the GPU (decode: V4-Flash at one token has 4),
the indices are split into SPLITS ranges of CHUNK keys: each range's program stores its running max, sum and
unnormalised output in float32, the sink counted once (in range 0), and `_merge_kernel` combines them by
log-sum-exp."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sparse_attention_kernel(
    # pointers
    q_ptr, kv_ptr, idx_ptr, sink_ptr, out_ptr,
    # sizes
    H, K, D, scale,
    # strides (elements)
    stride_qt, stride_qh, stride_kvn, stride_it, stride_ot, stride_oh,
    # the split's partial results (T, splits, H, D) and (T, splits, 2, H), indices per range
    part_ptr, ml_ptr, CHUNK,
    # constexprs
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    SPLIT: tl.constexpr,
):
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    dims = tl.arange(0, BLOCK_D)
    h_ok, d_ok = heads < H, dims < D
    q = tl.load(q_ptr + t * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)                     # (BLOCK_H, BLOCK_D)
    # online softmax that starts from the sink: m = sink, l = exp(sink - m) = 1, no value; ranges after the
    # first start empty (a finite m, so that a range with no valid index stays 0 without NaNs)
    sink = tl.load(sink_ptr + heads, mask=h_ok, other=0.0).to(tl.float32)
    m = tl.where(split == 0, sink, -1e30)
    l_sum = tl.where(split == 0, 1.0, 0.0) + tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    k_end = tl.minimum(K, (split + 1) * CHUNK)
    for k0 in range(split * CHUNK, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_ptr + t * stride_it + ks, mask=ks < k_end, other=-1)
        ok = idx >= 0
        rows = tl.load(kv_ptr + tl.where(ok, idx, 0).to(tl.int64)[:, None] * stride_kvn + dims[None, :],
                       mask=ok[:, None] & d_ok[None, :], other=0.0)                 # (BLOCK_K, BLOCK_D)
        if IEEE:       # float32 inputs: exact products (the GPU default would round them to TF32)
            s = tl.dot(q, tl.trans(rows), input_precision="ieee") * scale           # (BLOCK_H, BLOCK_K)
        else:
            s = tl.dot(q, tl.trans(rows)).to(tl.float32) * scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, rows, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(rows.dtype), rows).to(tl.float32)
        m = m_new
    hd_ok = h_ok[:, None] & d_ok[None, :]
    if SPLIT:     # (T, splits, H, D) partial outputs, (T, splits, 2, H) max and sum
        row = t * tl.num_programs(2) + split
        tl.store(part_ptr + (row * H + heads[:, None]).to(tl.int64) * D + dims[None, :], acc, mask=hd_ok)
        tl.store(ml_ptr + (row * 2) * H + heads, m, mask=h_ok)
        tl.store(ml_ptr + (row * 2 + 1) * H + heads, l_sum, mask=h_ok)
    else:
        out = acc / l_sum[:, None]
        tl.store(out_ptr + t * stride_ot + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=hd_ok)


@triton.jit
def _merge_kernel(part_ptr, ml_ptr, out_ptr, H, D, SPLITS, stride_ot, stride_oh,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t, h] = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s over the ranges s of one (token, head)."""
    t, h = tl.program_id(0), tl.program_id(1)
    ss, dims = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
    s_ok = ss < SPLITS
    rows = t * SPLITS + ss
    m = tl.load(ml_ptr + (rows * 2) * H + h, mask=s_ok, other=-1e30)
    l_sum = tl.load(ml_ptr + (rows * 2 + 1) * H + h, mask=s_ok, other=0.0)
    w = tl.exp(m - tl.max(m, 0))
    part = tl.load(part_ptr + (rows[:, None] * H + h).to(tl.int64) * D + dims[None, :],
                   mask=s_ok[:, None] & (dims < D)[None, :], other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.sum(l_sum * w, 0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dims < D)


def launch(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sink: torch.Tensor, scale: float,
           out: torch.Tensor) -> None:
    """Checked by v4_sparse_attention.sparse_attention; writes out (T, H, D)."""
    T, H, D = q.shape
    K = indices.shape[1]
    BLOCK_H = 16                                   # tl.dot needs at least 16 rows; padded heads are masked
    BLOCK_K = 32 if D > 256 else 64
    BLOCK_D = triton.next_power_of_2(D)
    programs = T * triton.cdiv(H, BLOCK_H)
    splits = max(1, min(triton.cdiv(K, 2 * BLOCK_K), 128 // programs))   # ranges of at least 2 index blocks
    chunk = triton.cdiv(triton.cdiv(K, splits), BLOCK_K) * BLOCK_K if K else BLOCK_K
    splits = max(1, triton.cdiv(K, chunk))
    part = ml = out                                                       # unused pointers without a split
    if splits > 1:
        part = torch.empty((T, splits, H, D), dtype=torch.float32, device=q.device)
        ml = torch.empty((T, splits, 2, H), dtype=torch.float32, device=q.device)
    _sparse_attention_kernel[(T, triton.cdiv(H, BLOCK_H), splits)](
        q, kv, indices, sink, out,
        H, K, D, scale,
        q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), out.stride(0), out.stride(1), part, ml, chunk,
        BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, IEEE=q.dtype == torch.float32, SPLIT=splits > 1,
        num_warps=4 if D <= 256 else 8)
    if splits > 1:
        _merge_kernel[(T, H)](part, ml, out, H, D, splits, out.stride(0), out.stride(1),
                              BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=BLOCK_D, num_warps=4)
