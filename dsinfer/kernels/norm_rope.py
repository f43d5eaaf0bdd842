"""The PyTorch twins of the norm and rotary kernels (no Triton here): RMSNorm's float32 formula and the rotation
of interleaved pairs, each rounded once to the input's dtype, as models.layers.RMSNorm and models.rope do."""

from __future__ import annotations

import torch


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., D), weight: (D,) float32 -> x * rsqrt(mean(x^2) + eps) * weight in float32, in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


def rotate_pairs_torch(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x: (T, d) or (T, H, d); cos_sin: (T, d/2, 2) float32 -> pairs (x[2i], x[2i+1]) rotated by angle i, in
    float32, rounded to x's dtype."""
    xf = x.float().reshape(x.shape[0], -1, x.shape[-1] // 2, 2)                 # (T, H, d/2, 2)
    cs = cos_sin.unsqueeze(1)
    cos, sin = cs[..., 0], cs[..., 1]
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).reshape(x.shape).to(x.dtype)
