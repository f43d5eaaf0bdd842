"""Manifold-constrained hyper-connections (mHC, DeepSeek-V4; spec section 2.9).

The residual is hc streams X: (T, hc, D). Before a sublayer, `hc_pre` mixes them into one input with sigmoid
weights `pre` and computes the weights for after it: `post` (how the sublayer output enters each stream) and
`comb`, an hc x hc matrix made doubly stochastic by Sinkhorn, which mixes the old streams. After the sublayer,
`hc_post` forms X'_k = post_k * out + sum_j comb[j, k] X_j (comb applied transposed: it is not symmetric).
`hc_head` collapses the streams once more before the final norm. Weights are computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _mixes(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """(T, hc, D) -> (T, fn rows) float32: the projection of the RMS-normalised flattened streams."""
    xf = x.flatten(1).float()                                                   # (T, hc*D)
    return F.linear(xf, fn.float()) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """(..., n, n) -> softmax over the last dim plus eps, then column / row normalisation, `iters` column passes."""
    c = logits.softmax(dim=-1) + eps
    c = c / (c.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(dim=-1, keepdim=True) + eps)
        c = c / (c.sum(dim=-2, keepdim=True) + eps)
    return c


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int, eps: float,
           norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (T, hc, D); fn: ((2+hc)*hc, hc*D), scale: (3,), base: ((2+hc)*hc,) float32.
    Returns the sublayer input (T, D) in x's dtype, post (T, hc) and comb (T, hc, hc) float32."""
    hc = x.shape[1]
    mixes = _mixes(x, fn, norm_eps)                                             # (T, (2+hc)*hc)
    pre_w, post_w, comb_w = mixes.split([hc, hc, hc * hc], dim=-1)
    pre_b, post_b, comb_b = base.float().split([hc, hc, hc * hc])
    s = scale.float()
    pre = torch.sigmoid(pre_w * s[0] + pre_b) + eps
    post = 2 * torch.sigmoid(post_w * s[1] + post_b)
    comb = sinkhorn((comb_w * s[2] + comb_b).unflatten(-1, (hc, hc)), iters, eps)   # (T, hc, hc)
    y = (pre.unsqueeze(-1) * x.float()).sum(dim=1)
    return y.to(x.dtype), post, comb


def hc_post(out: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """out: (T, D) sublayer output, x: (T, hc, D) streams before it -> new streams (T, hc, D), in float32 then
    rounded once (as the reference)."""
    mixed = torch.einsum("tjk,tjd->tkd", comb, x.float())                       # sum_j comb[j, k] X_j
    return (post.unsqueeze(-1) * out.float().unsqueeze(1) + mixed).to(x.dtype)


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, eps: float,
            norm_eps: float) -> torch.Tensor:
    """x: (T, hc, D); fn: (hc, hc*D), scale: (1,), base: (hc,) -> (T, D) in x's dtype."""
    pre = torch.sigmoid(_mixes(x, fn, norm_eps) * scale.float() + base.float()) + eps   # (T, hc)
    return (pre.unsqueeze(-1) * x.float()).sum(dim=1).to(x.dtype)
