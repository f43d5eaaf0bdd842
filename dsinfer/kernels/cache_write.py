"""Writing new tokens' latents into the paged cache, by slot (page * page_size + offset).

kv_cache: (pages, page_size, R + P) contiguous; slot_mapping: (T,) int64; c: (T, R); k_pe: (T, P).
Row slot of the flattened cache becomes [c | k_pe] in the cache dtype. `norm_rope_store` also does what comes
before it in MLA: from wkv_a's output [c | k_pe] it RMS-normalises c and rotates k_pe, all in one launch.
"""

from __future__ import annotations

import torch

from .norm_rope import rms_norm_torch, rotate_pairs_torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def store_latent_torch(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, c: torch.Tensor,
                       k_pe: torch.Tensor) -> None:
    kv_cache.view(-1, kv_cache.shape[-1])[slot_mapping] = torch.cat([c, k_pe], dim=-1).to(kv_cache.dtype)


def norm_rope_store_torch(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, kv: torch.Tensor,
                          norm_weight: torch.Tensor, eps: float, cos_sin: torch.Tensor) -> None:
    """kv: (T, R + P) wkv_a's output in the cache dtype; norm_weight: (R,) float32; cos_sin: (T, P/2, 2) float32.
    Stores [rms_norm(c) | rotate(k_pe)], each rounded once to the cache dtype, at the tokens' slots."""
    R = norm_weight.shape[0]
    c, k_pe = kv[:, :R], kv[:, R:]
    store_latent_torch(kv_cache, slot_mapping, rms_norm_torch(c, norm_weight, eps), rotate_pairs_torch(k_pe, cos_sin))


if triton is not None:
    @triton.jit
    def _norm_rope_store_kernel(KV, Slots, X, W, CS, stride_xt, stride_cst, eps,
                                R: tl.constexpr, HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        row = KV + tl.load(Slots + t) * (R + 2 * HALF)
        # c: RMSNorm in float32 with its weight, rounded once
        offs_r = tl.arange(0, BLOCK_R)
        c = tl.load(X + t * stride_xt + offs_r, mask=offs_r < R, other=0.0).to(tl.float32)
        w = tl.load(W + offs_r, mask=offs_r < R, other=0.0)
        c = c * tl.rsqrt(tl.sum(c * c, 0) / R + eps) * w
        tl.store(row + offs_r, c.to(KV.dtype.element_ty), mask=offs_r < R)
        # k_pe: interleaved pairs (x[2i], x[2i+1]) rotated by the angle of pair i, in float32
        i = tl.arange(0, BLOCK_H)
        ok = i < HALF
        x0 = tl.load(X + t * stride_xt + R + 2 * i, mask=ok, other=0.0).to(tl.float32)
        x1 = tl.load(X + t * stride_xt + R + 2 * i + 1, mask=ok, other=0.0).to(tl.float32)
        cos = tl.load(CS + t * stride_cst + 2 * i, mask=ok, other=0.0)
        sin = tl.load(CS + t * stride_cst + 2 * i + 1, mask=ok, other=0.0)
        tl.store(row + R + 2 * i, (x0 * cos - x1 * sin).to(KV.dtype.element_ty), mask=ok)
        tl.store(row + R + 2 * i + 1, (x0 * sin + x1 * cos).to(KV.dtype.element_ty), mask=ok)


def norm_rope_store(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, kv: torch.Tensor, norm_weight: torch.Tensor,
                    eps: float, cos_sin: torch.Tensor) -> None:
    """Triton version of norm_rope_store_torch (one program per token)."""
    T = kv.shape[0]
    R, D = norm_weight.shape[0], kv_cache.shape[-1]
    if (kv.shape != (T, D) or kv.dtype != kv_cache.dtype or not kv_cache.is_contiguous() or kv.stride(-1) != 1
            or slot_mapping.shape != (T,) or cos_sin.shape != (T, (D - R) // 2, 2) or not cos_sin.is_contiguous()):
        raise ValueError(f"cannot normalise, rotate and store latents {tuple(kv.shape)} {kv.dtype} with cos_sin "
                         f"{tuple(cos_sin.shape)} at {tuple(slot_mapping.shape)} slots of a cache "
                         f"{tuple(kv_cache.shape)} {kv_cache.dtype}")
    if T:
        half = (D - R) // 2
        _norm_rope_store_kernel[(T,)](kv_cache, slot_mapping, kv, norm_weight, cos_sin, kv.stride(0),
                                      cos_sin.stride(0), eps, R=R, HALF=half, BLOCK_R=triton.next_power_of_2(R),
                                      BLOCK_H=triton.next_power_of_2(half), num_warps=4)
