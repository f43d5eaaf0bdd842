"""FP8 block-scaled weights and activations: the pure-PyTorch twins that CPU runs and the Triton kernels are
tested against.

Format (DeepSeek V3/R1/V3.1): `w` is float8_e4m3fn of shape (N, K); `s` is float32 of shape
(ceil(N/bn), ceil(K/bk)) and W[i, j] = w[i, j] * s[i // bn, j // bk]. Edge blocks may be partial.
Activations are quantized per token in groups of 128 along the last dim: X[m, j] = q[m, j] * s[m, j // 128].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_MAX = 448.0
AMAX_MIN = 1e-4          # amax clamp: an all-zero group gets a finite scale (spec §5.1)
SCALE_FMTS = (None, "ue8m0")


def check_block_scale(w: torch.Tensor, s: torch.Tensor, block_size: tuple[int, int]) -> None:
    """Raise ValueError unless `s` is the block-scale grid of `w`."""
    if w.dim() != 2 or s.dim() != 2:
        raise ValueError(f"expected 2-D weight and scale, got {tuple(w.shape)} and {tuple(s.shape)}")
    bn, bk = block_size
    want = (-(-w.shape[0] // bn), -(-w.shape[1] // bk))
    if tuple(s.shape) != want:
        raise ValueError(f"scale of shape {tuple(s.shape)} does not match weight {tuple(w.shape)} with "
                         f"{bn}x{bk} blocks; expected {want}")


def weight_dequant_torch(w: torch.Tensor, s: torch.Tensor, block_size: tuple[int, int] = (128, 128),
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """w: (N, K) float8_e4m3fn, s: (ceil(N/bn), ceil(K/bk)) float32 -> (N, K) `dtype`."""
    check_block_scale(w, s, block_size)
    bn, bk = block_size
    n, k = w.shape
    scale = s.float().repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]
    return (w.float() * scale).to(dtype)


def weight_quant_torch(w: torch.Tensor, block_size: tuple[int, int] = (128, 128),
                       scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a (N, K) weight to the published FP8 format: per-block amax / 448 scales (power-of-two with ue8m0)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    bn, bk = block_size
    n, k = w.shape
    pn, pk = -(-n // bn) * bn, -(-k // bk) * bk
    wp = torch.zeros(pn, pk, dtype=torch.float32, device=w.device)
    wp[:n, :k] = w.float()
    blocks = wp.view(pn // bn, bn, pk // bk, bk)                      # (nb, bn, kb, bk)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4)            # (nb, kb)
    s = amax / FP8_MAX
    if scale_fmt == "ue8m0":
        s = torch.exp2(torch.ceil(torch.log2(s)))
    q = (blocks / s[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(pn, pk)[:n, :k]
    return q.to(torch.float8_e4m3fn).contiguous(), s.contiguous()


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= s, exactly (positive float32 s): the ue8m0 scale format."""
    mantissa, exponent = torch.frexp(s)                              # s = mantissa * 2^exponent, mantissa in [0.5, 1)
    return torch.where(mantissa == 0.5, s, torch.ldexp(torch.ones_like(s), exponent))


def act_quant_torch(x: torch.Tensor, block_size: int = 128,
                    scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (..., K) float -> q: (..., K) float8_e4m3fn, s: (..., ceil(K/block_size)) float32; last group may be partial.

    s = max(amax, 1e-4) / 448 per group (rounded up to a power of two with ue8m0); q = clamp(x / s, -448, 448)."""
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"unknown scale_fmt {scale_fmt!r}; choose None or 'ue8m0'")
    k = x.shape[-1]
    groups = -(-k // block_size)
    xf = F.pad(x.float(), (0, groups * block_size - k)).view(*x.shape[:-1], groups, block_size)   # (..., G, bs)
    s = xf.abs().amax(dim=-1).clamp(min=AMAX_MIN) / FP8_MAX
    if scale_fmt == "ue8m0":
        s = pow2_ceil(s)
    q = (xf / s[..., None]).clamp(-FP8_MAX, FP8_MAX).flatten(-2)[..., :k]
    return q.to(torch.float8_e4m3fn).contiguous(), s.contiguous()


def act_dequant_torch(q: torch.Tensor, s: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    """q: (..., K) float8_e4m3fn, s: (..., ceil(K/block_size)) float32 -> (..., K) float32."""
    return q.float() * s.repeat_interleave(block_size, dim=-1)[..., :q.shape[-1]]


def fp8_gemm_torch(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor) -> torch.Tensor:
    """Twin of the Triton fp8_gemm: a (M, K) e4m3 with (M, ceil(K/128)) scales, b (N, K) e4m3 with 128x128 block
    scales -> (M, N) bfloat16, dequantized and multiplied in float32."""
    return (act_dequant_torch(a, a_s) @ weight_dequant_torch(b, b_s, dtype=torch.float32).T).to(torch.bfloat16)


def fp8_weight_only_gemm_torch(x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor) -> torch.Tensor:
    """Twin of the Triton weight-only GEMM: x (M, K) bfloat16, w (N, K) e4m3 with 128x128 block scales -> (M, N)
    bfloat16, multiplied in float32."""
    return (x.float() @ weight_dequant_torch(w, w_s, dtype=torch.float32).T).to(torch.bfloat16)
