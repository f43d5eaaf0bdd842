"""The DeepSeek-V4 KV compressor's pooling step (spec section 2.8), in Triton, and its PyTorch twin.

Each compressed entry pools its window of `slots` tokens (ratio, or 2 * ratio with overlap) per channel with a
softmax over the gate scores, is RMS-normalised and has its last rd channels rotated at its window's position:
    pooled[c] = sum_j softmax_j(score[j, c]) kv[j, c]                     float32, rounded to out_dtype
    y = pooled * rsqrt(mean(pooled^2) + eps) * w                          float32, rounded to out_dtype
    y[-rd:] = rotate interleaved pairs (y[2i], y[2i+1]) by angle i        float32, rounded to out_dtype
The three roundings are the model's (`pooled.to(x.dtype)`, RMSNorm, `apply_rotary`), so with out_dtype bfloat16
the rotary channels are rounded twice and the others once. Used at prefill and by the decode update whenever a
window completes; the Hadamard / QAT steps after it stay in torch.
"""

from __future__ import annotations

import torch

from .norm_rope import rms_norm_torch, rotate_pairs_torch
from .triton_common import check_device, check_tensor

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def compress_pool_torch(kv: torch.Tensor, score: torch.Tensor, norm_weight: torch.Tensor, cos_sin: torch.Tensor,
                        eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """kv, score: (n, slots, d) float32 (score may be -inf, never a whole column); norm_weight: (d,) float32;
    cos_sin: (n, rd/2, 2) float32, the rope table at each entry's position. Returns (n, d) out_dtype."""
    pooled = (kv * score.softmax(dim=1)).sum(dim=1)                            # (n, d) float32
    entries = rms_norm_torch(pooled.to(out_dtype), norm_weight, eps)
    rd = 2 * cos_sin.shape[1]
    return torch.cat([entries[:, :-rd], rotate_pairs_torch(entries[:, -rd:], cos_sin)], dim=-1)


def compress_pool(kv: torch.Tensor, score: torch.Tensor, norm_weight: torch.Tensor, cos_sin: torch.Tensor,
                  eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """The Triton kernel; arguments and result as compress_pool_torch (d and rd even, 0 < rd <= d)."""
    check_tensor("kv", kv, (torch.float32,), 3)
    check_tensor("score", score, (torch.float32,), 3)
    check_tensor("norm_weight", norm_weight, (torch.float32,), 1)
    check_tensor("cos_sin", cos_sin, (torch.float32,), 3)
    check_device(kv=kv, score=score, norm_weight=norm_weight, cos_sin=cos_sin)
    if out_dtype not in OUT_DTYPES:
        allowed = ", ".join(str(t).removeprefix("torch.") for t in OUT_DTYPES)
        raise TypeError(f"out_dtype must be {allowed}; got {out_dtype}")
    n, slots, d = kv.shape
    if (score.shape != kv.shape or norm_weight.shape[0] != d or cos_sin.shape[0] != n or cos_sin.shape[2] != 2
            or slots == 0):
        raise ValueError(f"shapes do not agree: kv {tuple(kv.shape)}, score {tuple(score.shape)}, norm_weight "
                         f"{tuple(norm_weight.shape)}, cos_sin {tuple(cos_sin.shape)}; want (n, slots > 0, d), "
                         "(n, slots, d), (d,), (n, rd/2, 2)")
    rd = 2 * cos_sin.shape[1]
    if d % 2 or not 0 < rd <= d:
        raise ValueError(f"need an even d and 0 < rd <= d (rd = 2 * cos_sin.shape[1]); got d={d}, rd={rd}")
    out = torch.empty(n, d, dtype=out_dtype, device=kv.device)
    if n:
        from .v4_compress_triton import launch
        launch(kv, score, norm_weight, cos_sin, float(eps), out)
    return out
