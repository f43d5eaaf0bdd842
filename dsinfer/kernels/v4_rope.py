"""DeepSeek-V4 attention's per-head epilogues in one launch: the query's unweighted RMS norm and rotary, the key/
value row's rotary and FP8 QAT rounding, and the output's inverse rotary. Each is the last `rope_dim` dims of a
head rotated in interleaved pairs (spec section 2.7), optionally after an RMS norm of the whole head and beside an
FP8 round trip (ue8m0 scales per `qat_block` inputs) of the other dims. In PyTorch each is 6 to 25 launches at
decode (casts, norms, rotation, quantization, concatenation); `head_rope` (Triton) is one. Twin: `head_rope_torch`.
"""

from __future__ import annotations

import torch

from .fp4 import fp8_act_quant_dequant_torch
from .norm_rope import rotate_pairs_torch
from .triton_common import check_device, check_tensor


def rms_unweighted(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim; the factor in float32, the product in x's dtype (as HF)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def head_rope_torch(x: torch.Tensor, cos_sin: torch.Tensor, rope_dim: int, eps: float | None = None,
                    qat_block: int = 0, inverse: bool = False) -> torch.Tensor:
    """x: (T, H, d) or (T, d); cos_sin: (T, rope_dim/2, 2) float32. With eps: x = rms_unweighted(x, eps) first.
    The last rope_dim dims rotated (by minus the angle with `inverse`), the others FP8-rounded in blocks of
    qat_block (0: kept); in x's dtype."""
    if eps is not None:
        x = rms_unweighted(x, eps)
    if inverse:
        cos_sin = torch.stack([cos_sin[..., 0], -cos_sin[..., 1]], dim=-1)
    rest = x[..., :-rope_dim]
    if qat_block:
        rest = fp8_act_quant_dequant_torch(rest, qat_block)
    return torch.cat([rest, rotate_pairs_torch(x[..., -rope_dim:], cos_sin)], dim=-1)


def head_rope(x: torch.Tensor, cos_sin: torch.Tensor, rope_dim: int, eps: float | None = None,
              qat_block: int = 0, inverse: bool = False) -> torch.Tensor:
    """The Triton kernel; arguments and result as head_rope_torch (x contiguous; a new tensor)."""
    check_tensor("x", x, (torch.float32, torch.float16, torch.bfloat16))
    check_tensor("cos_sin", cos_sin, (torch.float32,), 3)
    check_device(x=x, cos_sin=cos_sin)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be (T, H, d) or (T, d), got shape {tuple(x.shape)}")
    T, d = x.shape[0], x.shape[-1]
    rest = d - rope_dim
    if rope_dim <= 0 or rope_dim % 2 or rest < 0 or tuple(cos_sin.shape) != (T, rope_dim // 2, 2):
        raise ValueError(f"rope_dim {rope_dim} must be even and at most the head width {d}, with cos_sin "
                         f"({T}, {rope_dim // 2}, 2); got cos_sin {tuple(cos_sin.shape)}")
    if qat_block and (qat_block & (qat_block - 1) or rest % qat_block):
        raise ValueError(f"qat_block {qat_block} must be a power of two dividing the {rest} unrotated dims")
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    y = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
    if T and x3.shape[1]:
        from .v4_rope_triton import launch
        launch(x3, cos_sin, y, rope_dim, eps, qat_block, inverse)
    return y.view(x.shape)
