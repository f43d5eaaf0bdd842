"""Manifold-constrained hyper-connections (mHC, DeepSeek-V4; spec section 2.9).

The residual is hc streams X: (T, hc, D). Before a sublayer, `hc_pre` mixes them into one input with sigmoid
weights `pre` and computes the weights for after it: `post` (how the sublayer output enters each stream) and
`comb`, an hc x hc matrix made doubly stochastic by Sinkhorn, which mixes the old streams. After the sublayer,
`hc_post` forms X'_k = post_k * out + sum_j comb[j, k] X_j (comb applied transposed: it is not symmetric).
`hc_head` collapses the streams once more before the final norm. Weights are computed in float32.
"""

from __future__ import annotations

import torch

from ..kernels.hyper_connections import hc_mixes_torch, hc_post_torch, hc_pre_torch
from ..kernels.hyper_connections import hc_post as hc_post_kernel
from ..kernels.hyper_connections import hc_pre as hc_pre_kernel


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int, eps: float,
           norm_eps: float, triton: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (T, hc, D); fn: ((2+hc)*hc, hc*D), scale: (3,), base: ((2+hc)*hc,) float32. Returns the sublayer input
    (T, D) in x's dtype, post (T, hc) and comb (T, hc, hc) float32: pre = sigmoid weights of the streams, post
    = 2 sigmoid, comb = Sinkhorn of the rest (kernels/hyper_connections.py has the formulas; `triton`: its kernel,
    else its PyTorch twin)."""
    if triton:
        return hc_pre_kernel(x.contiguous(), fn.float().contiguous(), scale.float(), base.float(), iters, eps,
                             norm_eps)
    return hc_pre_torch(x, fn, scale, base, iters, eps, norm_eps)


def hc_post(out: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
            triton: bool = False) -> torch.Tensor:
    """out: (T, D) sublayer output, x: (T, hc, D) streams before it -> new streams (T, hc, D): X'_k = post_k * out
    + sum_j comb[j, k] X_j, in float32 then rounded once (as the reference)."""
    if triton:
        return hc_post_kernel(out.to(x.dtype).contiguous(), x.contiguous(), post.contiguous(), comb.contiguous())
    return hc_post_torch(out, x, post, comb)


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, eps: float,
            norm_eps: float) -> torch.Tensor:
    """x: (T, hc, D); fn: (hc, hc*D), scale: (1,), base: (hc,) -> (T, D) in x's dtype."""
    pre = torch.sigmoid(hc_mixes_torch(x, fn, norm_eps) * scale.float() + base.float()) + eps   # (T, hc)
    return (pre.unsqueeze(-1) * x.float()).sum(dim=1).to(x.dtype)
