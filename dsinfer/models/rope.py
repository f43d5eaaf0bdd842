"""Rotary position embeddings with YaRN frequency blending, interleaved-pair layout (as DeepSeek trains them)."""

from __future__ import annotations

import math

import torch

from ..kernels.norm_rope import rotate_pairs_torch
from .args import RopeArgs, yarn_mscale


def rope_inv_freq(rope: RopeArgs, dim: int) -> torch.Tensor:
    """Inverse frequencies f_i = theta^(-2i/dim), blended towards f_i/factor by the YaRN ramp. (dim/2,) float64."""
    freqs = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if rope.rope_type != "yarn":
        return freqs

    def correction_dim(n_rot: float) -> float:
        return dim * math.log(rope.original_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(rope.theta))

    lo = max(math.floor(correction_dim(rope.beta_fast)), 0)
    hi = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
    return freqs / rope.factor * ramp + freqs * (1 - ramp)


def rope_attention_factor(rope: RopeArgs) -> float:
    """Factor on cos/sin, as HF computes it (1.0 for every DeepSeek release, where mscale == mscale_all_dim)."""
    if rope.rope_type != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return float(rope.attention_factor)
    if rope.mscale and rope.mscale_all_dim:
        return yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    return yarn_mscale(rope.factor)


def rope_cos_sin(rope: RopeArgs, dim: int, max_positions: int, device=None) -> torch.Tensor:
    """Table of (cos, sin) for positions [0, max_positions): (max_positions, dim/2, 2) float32."""
    inv_freq = rope_inv_freq(rope, dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    table = torch.stack([angles.cos(), angles.sin()], dim=-1) * rope_attention_factor(rope)
    return table.to(device=device, dtype=torch.float32)


def apply_rotary(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the angle of pair i, in float32, rounded to x's dtype.

    x: (T, ..., d) any float dtype; cos_sin: (T, d/2, 2) float32 gathered at each token's position. (The rotary
    kernels' twin: one formula for both.)
    """
    return rotate_pairs_torch(x, cos_sin)
