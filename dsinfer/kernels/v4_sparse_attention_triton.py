"""The Triton kernel of v4_sparse_attention.py (imported on first use: it imports triton)."""

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
    # constexprs
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    h_ok, d_ok = heads < H, dims < D
    q = tl.load(q_ptr + t * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)                     # (BLOCK_H, BLOCK_D)
    # online softmax that starts from the sink: m = sink, l = exp(sink - m) = 1, no value
    m = tl.load(sink_ptr + heads, mask=h_ok, other=0.0).to(tl.float32)
    l_sum = tl.full((BLOCK_H,), 1.0, tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_ptr + t * stride_it + ks, mask=ks < K, other=-1)
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
    out = acc / l_sum[:, None]
    tl.store(out_ptr + t * stride_ot + heads[:, None] * stride_oh + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=h_ok[:, None] & d_ok[None, :])


def launch(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sink: torch.Tensor, scale: float,
           out: torch.Tensor) -> None:
    """Checked by v4_sparse_attention.sparse_attention; writes out (T, H, D)."""
    T, H, D = q.shape
    K = indices.shape[1]
    BLOCK_H = 16                                   # tl.dot needs at least 16 rows; padded heads are masked
    BLOCK_K = 32 if D > 256 else 64
    BLOCK_D = triton.next_power_of_2(D)
    grid = (T, triton.cdiv(H, BLOCK_H))
    _sparse_attention_kernel[grid](
        q, kv, indices, sink, out,
        H, K, D, scale,
        q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), out.stride(0), out.stride(1),
        BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, IEEE=q.dtype == torch.float32,
        num_warps=4 if D <= 256 else 8)
