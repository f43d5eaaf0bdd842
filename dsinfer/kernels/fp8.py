"""FP8 block-scaled weights: the pure-PyTorch twins that CPU runs and the Triton kernels are tested against.

Format (DeepSeek V3/R1/V3.1): `w` is float8_e4m3fn of shape (N, K); `s` is float32 of shape
(ceil(N/bn), ceil(K/bk)) and W[i, j] = w[i, j] * s[i // bn, j // bk]. Edge blocks may be partial.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0


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
