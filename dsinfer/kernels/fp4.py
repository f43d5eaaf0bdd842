"""DeepSeek-V4 low-precision formats: E8M0 scales, FP4 e2m1 weights, and the quantize-dequantize round trips the
reference runs in its forward pass (QAT simulation). PyTorch twins; the GPU kernels come later.

Formats (spec section 3.4):
- E8M0: one byte b per scale, value 2^(b - 127); 0xFF is NaN. Stored as float8_e8m0fnu or uint8.
- FP4 e2m1: a 4-bit code, bit 3 the sign, bits 0-2 index {0, 0.5, 1, 1.5, 2, 3, 4, 6}. Two codes per byte along
  the input dim: element 2k in the low nibble, 2k+1 in the high nibble. Routed experts: W[i, j] =
  fp4(code[i, j]) * 2^(E[i, j // 32] - 127), i.e. (N, K/2) packed bytes with (N, K/32) E8M0 scales.
- FP8 e4m3 with E8M0 block scales: the V3 block format with power-of-two scales held in one byte.
"""

from __future__ import annotations

import torch

from .fp8 import FP8_MAX, act_dequant_torch, act_quant_torch, pow2_ceil, weight_dequant_torch

FP4_MAX = 6.0
FP4_BLOCK = 32                       # inputs per E8M0 scale in FP4 expert weights and FP4 activations
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_FP4_AMAX_MIN = FP4_MAX * 2.0 ** -126   # the reference's amax floor: keeps the scale a normal float32


def e8m0_to_float(s: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes (float8_e8m0fnu or uint8, any shape) -> float32 2^(b - 127); 0xFF -> NaN."""
    b = s.view(torch.uint8) if s.dtype == torch.float8_e8m0fnu else s
    if b.dtype != torch.uint8:
        raise TypeError(f"E8M0 scales must be float8_e8m0fnu or uint8, got {s.dtype}")
    out = torch.ldexp(torch.ones(b.shape, dtype=torch.float32, device=b.device), b.to(torch.int32) - 127)
    return out.masked_fill(b == 0xFF, float("nan"))


def fp4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """(..., K/2) int8/uint8 packed e2m1 codes -> (..., K) float32 values (unscaled)."""
    if packed.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"packed FP4 must be int8 or uint8, got {packed.dtype}")
    b = packed.view(torch.uint8).to(torch.int32)
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)                 # (..., K): low nibble first
    table = torch.tensor(FP4_VALUES, dtype=torch.float32, device=packed.device)
    mag = table[codes & 0x7]
    return torch.where(codes & 0x8 != 0, -mag, mag)


def fp4_dequant_torch(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                      block: int = FP4_BLOCK) -> torch.Tensor:
    """packed: (N, K/2) int8/uint8, scale: (N, K/block) E8M0 (or float32) -> (N, K) `dtype`."""
    n, half = packed.shape[-2:]
    k = 2 * half
    if k % block or tuple(scale.shape[-2:]) != (n, k // block):
        raise ValueError(f"FP4 scale of shape {tuple(scale.shape)} does not match packed weight "
                         f"{tuple(packed.shape)} with one scale per {block} inputs; expected {(n, k // block)}")
    s = scale.float() if scale.dtype == torch.float32 else e8m0_to_float(scale)
    return (fp4_unpack(packed) * s.repeat_interleave(block, dim=-1)).to(dtype)


_SHIFTS = range(-9, 7)                   # 2^shift of an FP4 code inside its FP8 tile: e4m3's range, 2^-9 .. 2^6


def _fp4_to_e4m3_table() -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 byte, exact?) of fp4(code) * 2^shift, indexed by (shift + 9) * 16 + code: 256 entries each."""
    vals = torch.tensor([(-1.0 if c & 8 else 1.0) * FP4_VALUES[c & 7] * 2.0 ** sh for sh in _SHIFTS for c in range(16)],
                        dtype=torch.float64)
    q = vals.to(torch.float8_e4m3fn)
    return q.view(torch.uint8), q.double() == vals


def fp4_to_fp8_torch(packed: torch.Tensor, scale: torch.Tensor,
                     block_size: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Repack FP4 e2m1 (N, K/2) bytes with (N, K/32) E8M0 scales as FP8 e4m3 (N, K) with one E8M0 scale per
    block_size tile, (ceil(N/bn), ceil(K/bk)) uint8, as the reference's `convert.py --expert-dtype fp8` does: a
    tile's scale is the largest of its 32-input scales over 64, s' = 2^(max b - 127) / 2^6, and each value becomes
    fp4 * 2^(b - b'), at most 6 * 64 = 384 < 448. Edge tiles take the largest scale they hold. Codes map to e4m3
    bytes through a 256-entry table of (shift, code), in integer ops. The result dequantizes to exactly the FP4
    values unless a tile's scales span more than 2^14, so that a small value leaves e4m3's range; ValueError then
    (and for NaN scales), never a silent loss."""
    n, k = packed.shape[0], 2 * packed.shape[1]
    bn, bk = block_size
    if packed.dim() != 2 or bk % FP4_BLOCK or tuple(scale.shape) != (n, k // FP4_BLOCK):
        raise ValueError(f"FP4 -> FP8 takes a 2-D packed weight with (N, K/{FP4_BLOCK}) scales and tiles whose width "
                         f"is a multiple of {FP4_BLOCK}; got {tuple(packed.shape)}, {tuple(scale.shape)}, {block_size}")
    if scale.dtype not in (torch.uint8, torch.float8_e8m0fnu):
        raise TypeError(f"FP4 -> FP8 takes E8M0 scale bytes (uint8 or float8_e8m0fnu), got {scale.dtype}")
    b = scale.view(torch.uint8).to(torch.int32)
    tn, tk, per_tile = -(-n // bn), -(-k // bk), bk // FP4_BLOCK
    padded = torch.nn.functional.pad(b, (0, tk * per_tile - b.shape[1], 0, tn * bn - n))    # pad with byte 0
    tile = (padded.view(tn, bn, tk, per_tile).amax(dim=(1, 3)) - 6).clamp(min=0)          # (tn, tk) bytes
    shift = b - tile.repeat_interleave(bn, 0)[:n].repeat_interleave(per_tile, 1)[:, :b.shape[1]]   # (N, K/32)
    if (b == 0xFF).any():
        raise ValueError("FP4 -> FP8: a scale is NaN (E8M0 byte 0xFF); cast to bf16 instead")
    row = ((shift.clamp(min=_SHIFTS[0]) - _SHIFTS[0]) * 16).repeat_interleave(FP4_BLOCK // 2, dim=-1)   # (N, K/2)
    u = packed.view(torch.uint8).to(torch.int32)
    idx = torch.stack([row + (u & 0xF), row + (u >> 4)], dim=-1).view(-1)       # element 2j low nibble, 2j+1 high
    table, exact = (t.to(packed.device) for t in _fp4_to_e4m3_table())
    small = (shift < _SHIFTS[0]).repeat_interleave(FP4_BLOCK // 2, dim=-1)       # below e4m3: only zeros survive
    if not exact.index_select(0, idx).all() or (small & ((u & 0x77) != 0)).any():
        raise ValueError("FP4 -> FP8 repacking would change some weights: a 128x128 tile mixes 32-input scales "
                         "more than 2^14 apart; cast to bf16 instead")
    q = table.index_select(0, idx).view(n, k)
    return q.view(torch.float8_e4m3fn), tile.to(torch.uint8)


def fp8_e8m0_dequant_torch(w: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int] = (128, 128),
                           dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """w: (N, K) float8_e4m3fn, scale: (ceil(N/bn), ceil(K/bk)) E8M0 bytes -> (N, K) `dtype`."""
    return weight_dequant_torch(w, e8m0_to_float(scale), block_size, dtype)


def fp4_round(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values in [-6, 6] to the nearest e2m1 value, ties to the even code (as a float->e2m1 cast)."""
    a = x.abs()
    # Between grid points the spacing is 0.5 below 2, 1 in [2, 4), 2 in [4, 6]: scale, round half to even, unscale.
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    r = torch.round(a / step) * step                                   # torch.round is half-to-even
    return torch.copysign(r.clamp(max=FP4_MAX), x)


def fp4_act_quant_dequant_torch(x: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """The reference's in-place FP4 round trip: per `block` values along the last dim, s = 2^ceil(log2(amax / 6)),
    x -> e2m1(clamp(x / s, -6, 6)) * s. (..., K) -> (..., K) in x's dtype; K must be a multiple of `block`."""
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"FP4 activation quantization needs the last dim ({k}) to be a multiple of {block}")
    xf = x.float().unflatten(-1, (k // block, block))                       # (..., G, block)
    s = pow2_ceil(xf.abs().amax(dim=-1, keepdim=True).clamp(min=_FP4_AMAX_MIN) / FP4_MAX)
    q = fp4_round((xf / s).clamp(-FP4_MAX, FP4_MAX))
    return (q * s).flatten(-2).to(x.dtype)


def fp8_act_quant_dequant_torch(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """The reference's in-place FP8 round trip with ue8m0 scales: (..., K) -> (..., K) in x's dtype."""
    q, s = act_quant_torch(x, block, "ue8m0")
    return act_dequant_torch(q, s, block).to(x.dtype)


__all__ = [
    "FP4_BLOCK",
    "FP4_MAX",
    "FP8_MAX",
    "e8m0_to_float",
    "fp4_act_quant_dequant_torch",
    "fp4_dequant_torch",
    "fp4_round",
    "fp4_to_fp8_torch",
    "fp4_unpack",
    "fp8_act_quant_dequant_torch",
    "fp8_e8m0_dequant_torch",
]
