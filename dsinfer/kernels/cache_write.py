"""Writing new tokens' latents into the paged cache, by slot (page * page_size + offset).

kv_cache: (pages, page_size, R + P) contiguous; slot_mapping: (T,) int64; c: (T, R); k_pe: (T, P).
Row slot of the flattened cache becomes [c | k_pe] in the cache dtype.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def store_latent_torch(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, c: torch.Tensor,
                       k_pe: torch.Tensor) -> None:
    kv_cache.view(-1, kv_cache.shape[-1])[slot_mapping] = torch.cat([c, k_pe], dim=-1).to(kv_cache.dtype)


if triton is not None:
    @triton.jit
    def _store_latent_kernel(KV, Slots, C, KPe, stride_ct, stride_pt,
                             R: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
        t = tl.program_id(0)
        slot = tl.load(Slots + t)
        row = KV + slot * (R + P)
        offs_r, offs_p = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_P)
        c = tl.load(C + t * stride_ct + offs_r, mask=offs_r < R)
        tl.store(row + offs_r, c.to(KV.dtype.element_ty), mask=offs_r < R)
        kp = tl.load(KPe + t * stride_pt + offs_p, mask=offs_p < P)
        tl.store(row + R + offs_p, kp.to(KV.dtype.element_ty), mask=offs_p < P)


def store_latent(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, c: torch.Tensor, k_pe: torch.Tensor) -> None:
    """Triton version of store_latent_torch (one program per token)."""
    T, R = c.shape
    P = k_pe.shape[-1]
    if kv_cache.shape[-1] != R + P or not kv_cache.is_contiguous() or slot_mapping.shape != (T,):
        raise ValueError(f"cannot store latents {tuple(c.shape)} + {tuple(k_pe.shape)} at {tuple(slot_mapping.shape)} "
                         f"slots of a cache {tuple(kv_cache.shape)}")
    if c.stride(-1) != 1 or k_pe.stride(-1) != 1:
        raise ValueError("c and k_pe need a contiguous last dim")
    if T:
        _store_latent_kernel[(T,)](kv_cache, slot_mapping, c, k_pe, c.stride(0), k_pe.stride(0), R=R, P=P,
                                   BLOCK_R=triton.next_power_of_2(R), BLOCK_P=triton.next_power_of_2(P))
