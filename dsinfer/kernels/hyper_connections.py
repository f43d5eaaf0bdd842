"""Manifold-constrained hyper-connection mixing (mHC, DeepSeek-V4; spec section 2.9) in Triton, and its PyTorch
twins.

The residual is hc streams X: (T, hc, D). The projection `mixes` = RMSNorm(flatten(X)) @ fn^T, (T, (2+hc)*hc),
splits into pre_w (hc), post_w (hc) and comb_w (hc*hc). Per token:
    pre  = sigmoid(s0 * pre_w + pre_b) + eps                           (hc,)    weights that mix X into y
    post = 2 * sigmoid(s1 * post_w + post_b)                           (hc,)    how the sublayer output enters
    comb = sinkhorn(s2 * comb_w + comb_b)                              (hc, hc) near doubly stochastic
    y    = sum_k pre_k X_k                                             (D,)     the sublayer input
sinkhorn: softmax over each row, + eps, divide each column by (its sum + eps), then `iters - 1` times a row pass
and a column pass (iters < 1 acts as 1, as in the model). After the sublayer:
    X'_k = post_k * out + sum_j comb[j, k] X_j                         (comb applied transposed)
All math is float32; y and X' are rounded once to X's dtype.

hc_pre runs two kernels. The first splits each token's hc*D inputs into chunks of 512 and forms, per chunk, the
products with every row of fn and the sum of squares (at one token, 32 programs share fn's 1.5 MB instead of one
GEMV); the second sums the chunks, applies the RMS norm, and runs a program per (token, block of D) for y, the
first of which also does the Sinkhorn in registers (one warp: its 4 x 4 reductions stay within the warp). Past
FUSED_MAX_T tokens (prefill) the projection is one torch GEMM instead. hc_pre_mix is the second kernel alone, on
given mixes. hc_post runs one program per (token, block of D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .triton_common import check_device, check_tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HC = 8                                     # the kernels pad hc to a power of two up to this
FUSED_MAX_T = 64                               # hc_pre forms the projection in its own kernel up to this many tokens


def hc_mixes_torch(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """(T, hc, D) -> (T, fn rows) float32: the projection of the RMS-normalised flattened streams."""
    xf = x.flatten(1).float()                                                   # (T, hc*D)
    return F.linear(xf, fn.float()) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)


def hc_pre_mix_torch(x: torch.Tensor, mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (T, hc, D) f32/f16/bf16; mixes: (T, (2+hc)*hc) f32; scale: (3,) f32; base: ((2+hc)*hc,) f32.
    Returns y (T, D) in x's dtype, post (T, hc) f32, comb (T, hc, hc) f32."""
    hc = x.shape[1]
    pre_w, post_w, comb_w = mixes.float().split([hc, hc, hc * hc], dim=-1)
    pre_b, post_b, comb_b = base.float().split([hc, hc, hc * hc])
    s = scale.float()
    pre = torch.sigmoid(pre_w * s[0] + pre_b) + eps                             # (T, hc)
    post = 2 * torch.sigmoid(post_w * s[1] + post_b)                            # (T, hc)
    c = (comb_w * s[2] + comb_b).unflatten(-1, (hc, hc)).softmax(dim=-1) + eps  # (T, hc, hc)
    c = c / (c.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(dim=-1, keepdim=True) + eps)                             # rows
        c = c / (c.sum(dim=-2, keepdim=True) + eps)                             # columns
    y = (pre.unsqueeze(-1) * x.float()).sum(dim=1)                              # (T, D)
    return y.to(x.dtype), post, c


def hc_pre_torch(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int,
                 eps: float, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (T, hc, D); fn: ((2+hc)*hc, hc*D) float32 -> y, post, comb as hc_pre_mix_torch, from the projection."""
    return hc_pre_mix_torch(x, hc_mixes_torch(x, fn, norm_eps), scale, base, iters, eps)


def hc_post_torch(out: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """out: (T, D) sublayer output; x: (T, hc, D) streams before it; post: (T, hc) f32; comb: (T, hc, hc) f32.
    Returns the new streams (T, hc, D) in x's dtype: post_k * out + sum_j comb[j, k] x_j, rounded once."""
    mixed = torch.einsum("tjk,tjd->tkd", comb.float(), x.float())               # (T, hc, D)
    return (post.float().unsqueeze(-1) * out.float().unsqueeze(1) + mixed).to(x.dtype)


def _check_hc(x: torch.Tensor) -> tuple[int, int, int]:
    T, hc, D = x.shape
    if not 1 <= hc <= MAX_HC:
        raise ValueError(f"x must have 1 to {MAX_HC} hyper-connection streams (dim 1), got shape {tuple(x.shape)}")
    return T, hc, D


def _check_pre(x: torch.Tensor, scale: torch.Tensor, base: torch.Tensor) -> tuple[int, int, int, int]:
    check_tensor("x", x, DTYPES, 3)
    check_tensor("scale", scale, (torch.float32,), 1)
    check_tensor("base", base, (torch.float32,), 1)
    check_device(x=x, scale=scale, base=base)
    T, hc, D = _check_hc(x)
    mix = (2 + hc) * hc
    if scale.shape != (3,) or base.shape != (mix,):
        raise ValueError(f"shapes do not agree: x {tuple(x.shape)} needs scale (3,) and base ({mix},); got scale "
                         f"{tuple(scale.shape)}, base {tuple(base.shape)}")
    return T, hc, D, mix


def hc_pre_mix(x: torch.Tensor, mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int,
               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The second Triton kernel alone, on given mixes; arguments and results as hc_pre_mix_torch."""
    T, hc, D, mix = _check_pre(x, scale, base)
    check_tensor("mixes", mixes, (torch.float32,), 2)
    check_device(x=x, mixes=mixes)
    if mixes.shape != (T, mix):
        raise ValueError(f"shapes do not agree: x {tuple(x.shape)} needs mixes ({T}, {mix}); got "
                         f"{tuple(mixes.shape)}")
    return _pre_mix(x, mixes, scale, base, iters, eps)


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int, eps: float,
           norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton kernels, projection included; arguments and results as hc_pre_torch."""
    T, hc, D, mix = _check_pre(x, scale, base)
    check_tensor("fn", fn, (torch.float32,), 2)
    check_device(x=x, fn=fn)
    if fn.shape != (mix, hc * D):
        raise ValueError(f"shapes do not agree: x {tuple(x.shape)} needs fn ({mix}, {hc * D}); got "
                         f"{tuple(fn.shape)}")
    if T > FUSED_MAX_T:
        return _pre_mix(x, hc_mixes_torch(x, fn, norm_eps), scale, base, iters, eps)
    from .hyper_connections_triton import launch_mixes
    part = launch_mixes(x, fn) if T else fn.new_empty(0, 1, mix + 1)
    return _pre_mix(x, part, scale, base, iters, eps, norm_eps)


def _pre_mix(x, mixes, scale, base, iters, eps, norm_eps=0.0):
    """Launch the second kernel on mixes (T, MIX) or the first kernel's partials (T, splits, MIX + 1)."""
    T, hc, D = x.shape
    y = torch.empty((T, D), dtype=x.dtype, device=x.device)
    post = torch.empty((T, hc), dtype=torch.float32, device=x.device)
    comb = torch.empty((T, hc, hc), dtype=torch.float32, device=x.device)
    if T:
        from .hyper_connections_triton import launch_pre_mix
        launch_pre_mix(x, mixes, scale, base, int(iters), float(eps), y, post, comb, float(norm_eps))
    return y, post, comb


def hc_post(out: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """The Triton kernel; arguments and result as hc_post_torch (out in x's dtype)."""
    check_tensor("x", x, DTYPES, 3)
    check_tensor("out", out, (x.dtype,), 2)
    check_tensor("post", post, (torch.float32,), 2)
    check_tensor("comb", comb, (torch.float32,), 3)
    check_device(out=out, x=x, post=post, comb=comb)
    T, hc, D = _check_hc(x)
    if out.shape != (T, D) or post.shape != (T, hc) or comb.shape != (T, hc, hc):
        raise ValueError(f"shapes do not agree: x {tuple(x.shape)} needs out ({T}, {D}), post ({T}, {hc}), comb "
                         f"({T}, {hc}, {hc}); got out {tuple(out.shape)}, post {tuple(post.shape)}, comb "
                         f"{tuple(comb.shape)}")
    new = torch.empty_like(x)
    if T and D:
        from .hyper_connections_triton import launch_post
        launch_post(out, x, post, comb, new)
    return new
