"""The Triton kernels of hyper_connections.py (imported on first use: it imports triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _hc_pre_mix_kernel(
    # pointers
    x_ptr, mixes_ptr, scale_ptr, base_ptr, y_ptr, post_ptr, comb_ptr,
    # sizes
    HC, D, iters, eps,
    # strides (elements)
    stride_xt, stride_xh, stride_mt, stride_yt, stride_pt, stride_ct, stride_ch,
    # constexprs
    BLOCK_HC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)             # int64: t * stride_xt passes 2^31 for long prefills
    rows = tl.arange(0, BLOCK_HC)                  # stream j (the row of comb), padded to a power of two
    cols = tl.arange(0, BLOCK_HC)                  # stream k (the column of comb)
    r_ok, c_ok = rows < HC, cols < HC
    tile_ok = r_ok[:, None] & c_ok[None, :]
    s0 = tl.load(scale_ptr)
    s1 = tl.load(scale_ptr + 1)
    s2 = tl.load(scale_ptr + 2)
    mix_row = mixes_ptr + t * stride_mt            # [pre_w (HC) | post_w (HC) | comb_w (HC*HC), row-major]

    # pre = sigmoid(s0 * pre_w + pre_b) + eps; padded streams get 0 so they add nothing to y
    pre = tl.load(mix_row + rows, mask=r_ok, other=0.0) * s0 + tl.load(base_ptr + rows, mask=r_ok, other=0.0)
    pre = tl.where(r_ok, tl.sigmoid(pre) + eps, 0.0)

    # post = 2 * sigmoid(s1 * post_w + post_b)
    post = tl.load(mix_row + HC + cols, mask=c_ok, other=0.0) * s1 + tl.load(base_ptr + HC + cols, mask=c_ok,
                                                                             other=0.0)
    tl.store(post_ptr + t * stride_pt + cols, 2.0 * tl.sigmoid(post), mask=c_ok)

    # comb logits (BLOCK_HC, BLOCK_HC) = s2 * comb_w + comb_b; padded columns are -inf for the softmax, padded
    # rows stay finite (all zero) so no NaN appears, and are zeroed below
    offs = 2 * HC + rows[:, None] * HC + cols[None, :]
    logits = tl.load(mix_row + offs, mask=tile_ok, other=0.0) * s2 + tl.load(base_ptr + offs, mask=tile_ok,
                                                                             other=0.0)
    logits = tl.where(c_ok[None, :], logits, float("-inf"))
    # softmax over each row, + eps; then zero the padding so the sums below see only the hc x hc block
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    c = e / tl.sum(e, axis=1)[:, None] + eps
    c = tl.where(tile_ok, c, 0.0)
    # Sinkhorn: a column pass, then iters - 1 (row pass, column pass); zeros stay zero
    c = c / (tl.sum(c, axis=0)[None, :] + eps)
    for _ in range(iters - 1):
        c = c / (tl.sum(c, axis=1)[:, None] + eps)
        c = c / (tl.sum(c, axis=0)[None, :] + eps)
    tl.store(comb_ptr + t * stride_ct + rows[:, None] * stride_ch + cols[None, :], c, mask=tile_ok)

    # y = sum_k pre_k x_k, streamed over D in blocks: each block is a (BLOCK_HC, BLOCK_D) tile of x
    x_row = x_ptr + t * stride_xt
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        d_ok = dims < D
        xs = tl.load(x_row + rows[:, None] * stride_xh + dims[None, :], mask=r_ok[:, None] & d_ok[None, :],
                     other=0.0).to(tl.float32)
        y = tl.sum(pre[:, None] * xs, axis=0)                                           # (BLOCK_D,)
        tl.store(y_ptr + t * stride_yt + dims, y.to(y_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _hc_post_kernel(
    # pointers
    out_ptr, x_ptr, post_ptr, comb_ptr, new_ptr,
    # sizes
    HC, D,
    # strides (elements)
    stride_ot, stride_xt, stride_xh, stride_pt, stride_ct, stride_ch, stride_nt, stride_nh,
    # constexprs
    BLOCK_HC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)             # int64: t * stride_xt passes 2^31 for long prefills
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ks = tl.arange(0, BLOCK_HC)                    # output stream k, padded to a power of two
    d_ok, k_ok = dims < D, ks < HC
    # mixed[k, d] = sum_j comb[j, k] x[j, d]: one x row and one comb row (over k) per step
    mixed = tl.zeros((BLOCK_HC, BLOCK_D), tl.float32)
    for j in range(HC):
        xj = tl.load(x_ptr + t * stride_xt + j * stride_xh + dims, mask=d_ok, other=0.0).to(tl.float32)
        cj = tl.load(comb_ptr + t * stride_ct + j * stride_ch + ks, mask=k_ok, other=0.0)
        mixed += cj[:, None] * xj[None, :]
    # new[k] = post_k * out + mixed[k], rounded once to x's dtype
    out = tl.load(out_ptr + t * stride_ot + dims, mask=d_ok, other=0.0).to(tl.float32)
    post = tl.load(post_ptr + t * stride_pt + ks, mask=k_ok, other=0.0)
    new = post[:, None] * out[None, :] + mixed
    tl.store(new_ptr + t * stride_nt + ks[:, None] * stride_nh + dims[None, :], new.to(new_ptr.dtype.element_ty),
             mask=k_ok[:, None] & d_ok[None, :])


def _block_d(D: int) -> int:
    return min(256, max(16, triton.next_power_of_2(D)))


def launch_pre_mix(x: torch.Tensor, mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int,
                   eps: float, y: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> None:
    """Checked by hyper_connections.hc_pre_mix; writes y (T, D), post (T, hc), comb (T, hc, hc)."""
    T, HC, D = x.shape
    _hc_pre_mix_kernel[(T,)](
        x, mixes, scale, base, y, post, comb,
        HC, D, iters, eps,
        x.stride(0), x.stride(1), mixes.stride(0), y.stride(0), post.stride(0), comb.stride(0), comb.stride(1),
        BLOCK_HC=triton.next_power_of_2(HC), BLOCK_D=_block_d(D), num_warps=4)


def launch_post(out: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                new: torch.Tensor) -> None:
    """Checked by hyper_connections.hc_post; writes new (T, hc, D)."""
    T, HC, D = x.shape
    BLOCK_D = _block_d(D)
    _hc_post_kernel[(T, triton.cdiv(D, BLOCK_D))](
        out, x, post, comb, new,
        HC, D,
        out.stride(0), x.stride(0), x.stride(1), post.stride(0), comb.stride(0), comb.stride(1), new.stride(0),
        new.stride(1),
        BLOCK_HC=triton.next_power_of_2(HC), BLOCK_D=BLOCK_D, num_warps=4)
