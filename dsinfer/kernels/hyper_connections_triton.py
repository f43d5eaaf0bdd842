"""The Triton kernels of hyper_connections.py (imported on first use: it imports triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _hc_mixes_kernel(
    x_ptr, fn_ptr, part_ptr,
    K, MIX,
    stride_xt, stride_fn, stride_pt, stride_ps,
    BLOCK_MIX: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Split K: program (t, s) forms, over inputs [s * CHUNK, (s + 1) * CHUNK) of token t's flattened streams, the
    partial products with every row of fn and the partial sum of squares: part[t, s] = (x . fn_r for each r, x . x)."""
    t = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    rows = tl.arange(0, BLOCK_MIX)
    r_ok = rows < MIX
    acc = tl.zeros((BLOCK_MIX, BLOCK_K), tl.float32)
    sq = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(s * CHUNK, s * CHUNK + CHUNK, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xv = tl.load(x_ptr + t * stride_xt + ks, mask=k_ok, other=0.0).to(tl.float32)
        f = tl.load(fn_ptr + rows[:, None] * stride_fn + ks[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        acc += f * xv[None, :]
        sq += xv * xv
    row = part_ptr + t * stride_pt + s * stride_ps
    tl.store(row + rows, tl.sum(acc, axis=1), mask=r_ok)
    tl.store(row + MIX, tl.sum(sq, axis=0))


@triton.jit
def _mix(mix_row, offs, mask, rnorm, splits, stride_ms, SPLITS: tl.constexpr):
    """Entries `offs` (1-D) of a token's mixes: the sum of its `splits` rows of partial products (one row: the
    mixes themselves), times rnorm. SPLITS: splits rounded up to a power of two."""
    s = tl.arange(0, SPLITS)
    parts = tl.load(mix_row + s[:, None] * stride_ms + offs[None, :], mask=(s < splits)[:, None] & mask[None, :],
                    other=0.0)
    return tl.sum(parts, axis=0) * rnorm


@triton.jit
def _hc_pre_mix_kernel(
    # pointers
    x_ptr, mixes_ptr, scale_ptr, base_ptr, y_ptr, post_ptr, comb_ptr,
    # sizes
    HC, D, iters, eps, norm_k, norm_eps, splits,
    # strides (elements)
    stride_xt, stride_xh, stride_mt, stride_ms, stride_yt, stride_pt, stride_ct, stride_ch,
    # constexprs
    BLOCK_HC: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, NORM: tl.constexpr,
):
    """Program (t, d): y[t, d-block]; program (t, 0) also post[t] and comb[t]. NORM: mixes holds the (T, splits,
    MIX + 1) partial products of _hc_mixes_kernel (the last column the sums of squares), SPLITS = splits rounded
    up to a power of two; else the (T, MIX) mixes themselves (SPLITS = 1)."""
    t = tl.program_id(0).to(tl.int64)             # int64: t * stride_xt passes 2^31 for long prefills
    rows = tl.arange(0, BLOCK_HC)                  # stream j (the row of comb), padded to a power of two
    cols = tl.arange(0, BLOCK_HC)                  # stream k (the column of comb)
    r_ok, c_ok = rows < HC, cols < HC
    tile_ok = r_ok[:, None] & c_ok[None, :]
    mix_row = mixes_ptr + t * stride_mt            # [pre_w (HC) | post_w (HC) | comb_w (HC*HC), row-major]
    rnorm = 1.0
    if NORM:                                       # RMSNorm of the flattened streams, applied to the products
        sq = tl.sum(tl.load(mix_row + tl.arange(0, SPLITS) * stride_ms + (2 + HC) * HC,
                            mask=tl.arange(0, SPLITS) < splits, other=0.0), axis=0)
        rnorm = 1.0 / tl.sqrt(sq / norm_k + norm_eps)

    # pre = sigmoid(s0 * pre_w + pre_b) + eps; padded streams get 0 so they add nothing to y
    pre = _mix(mix_row, rows, r_ok, rnorm, splits, stride_ms, SPLITS) * tl.load(scale_ptr) \
        + tl.load(base_ptr + rows, mask=r_ok, other=0.0)
    pre = tl.where(r_ok, tl.sigmoid(pre) + eps, 0.0)

    if tl.program_id(1) == 0:
        # post = 2 * sigmoid(s1 * post_w + post_b)
        post = _mix(mix_row, HC + cols, c_ok, rnorm, splits, stride_ms, SPLITS) * tl.load(scale_ptr + 1) \
            + tl.load(base_ptr + HC + cols, mask=c_ok, other=0.0)
        tl.store(post_ptr + t * stride_pt + cols, 2.0 * tl.sigmoid(post), mask=c_ok)
        # comb logits (BLOCK_HC, BLOCK_HC) = s2 * comb_w + comb_b, gathered flat; padded columns are -inf for the
        # softmax, padded rows stay finite (all zero) so no NaN appears, and are zeroed below
        flat = tl.arange(0, BLOCK_HC * BLOCK_HC)
        flat_ok = (flat // BLOCK_HC < HC) & (flat % BLOCK_HC < HC)
        offs = 2 * HC + (flat // BLOCK_HC) * HC + flat % BLOCK_HC
        logits = _mix(mix_row, offs, flat_ok, rnorm, splits, stride_ms, SPLITS) * tl.load(scale_ptr + 2) \
            + tl.load(base_ptr + offs, mask=flat_ok, other=0.0)
        logits = tl.reshape(logits, (BLOCK_HC, BLOCK_HC))
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

    # y = sum_k pre_k x_k over this program's block of D: a (BLOCK_HC, BLOCK_D) tile of x
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dims < D
    xs = tl.load(x_ptr + t * stride_xt + rows[:, None] * stride_xh + dims[None, :], mask=r_ok[:, None] & d_ok[None, :],
                 other=0.0).to(tl.float32)
    y = tl.sum(pre[:, None] * xs, axis=0)                                               # (BLOCK_D,)
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
                   eps: float, y: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                   norm_eps: float = 0.0) -> None:
    """Checked by hyper_connections.hc_pre_mix / hc_pre; writes y (T, D), post (T, hc), comb (T, hc, hc). mixes:
    (T, MIX), or (T, splits, MIX + 1) partial products (launch_mixes) to be summed and RMS-normalised here."""
    T, HC, D = x.shape
    BLOCK_D = _block_d(D)
    splits = mixes.shape[1] if mixes.dim() == 3 else 1
    _hc_pre_mix_kernel[(T, triton.cdiv(D, BLOCK_D))](
        x, mixes, scale, base, y, post, comb,
        HC, D, iters, eps, float(HC * D), norm_eps, splits,
        x.stride(0), x.stride(1), mixes.stride(0), mixes.stride(1) if mixes.dim() == 3 else 0, y.stride(0),
        post.stride(0), comb.stride(0), comb.stride(1),
        BLOCK_HC=triton.next_power_of_2(HC), BLOCK_D=BLOCK_D, SPLITS=triton.next_power_of_2(splits),
        NORM=mixes.dim() == 3, num_warps=1)


MIXES_CHUNK = 128                              # inputs per program of launch_mixes: one K step each


def launch_mixes(x: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    """x: (T, hc, D) contiguous, fn: (MIX, hc*D) float32 contiguous -> (T, splits, MIX + 1) float32 partials."""
    T, K = x.shape[0], x.shape[1] * x.shape[2]
    mix = fn.shape[0]
    splits = triton.cdiv(K, MIXES_CHUNK)
    part = torch.empty((T, splits, mix + 1), dtype=torch.float32, device=x.device)
    _hc_mixes_kernel[(T, splits)](x, fn, part, K, mix, K, fn.stride(0), part.stride(0), part.stride(1),
                                  BLOCK_MIX=triton.next_power_of_2(mix), CHUNK=MIXES_CHUNK, BLOCK_K=128,
                                  num_warps=4)
    return part


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
