"""The paged latent cache: per layer, pages of `page_size` tokens x (kv_lora_rank + qk_rope_head_dim) values,
and a free list of page indices shared by all layers."""

from __future__ import annotations

import torch

from ..models import ModelArgs


def cache_bytes_per_page(args: ModelArgs, page_size: int, dtype: torch.dtype) -> int:
    return args.n_layers * page_size * args.kv_cache_dim * torch.empty((), dtype=dtype).element_size()


class KVCache:
    def __init__(self, args: ModelArgs, num_pages: int, page_size: int, dtype: torch.dtype, device: torch.device):
        if num_pages < 1:
            raise ValueError("the KV cache budget is too small for even one page; raise cpu_cache_gib (CPU) or "
                             "gpu_memory_utilization (GPU)")
        self.num_pages, self.page_size = num_pages, page_size
        # Rows are only read after they are written, so the pages need no initialisation.
        self.layers = [torch.empty(num_pages, page_size, args.kv_cache_dim, dtype=dtype, device=device)
                       for _ in range(args.n_layers)]
        self.free_pages = list(range(num_pages - 1, -1, -1))

    @property
    def num_free_pages(self) -> int:
        return len(self.free_pages)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_pages):
            raise RuntimeError(f"asked for {n} pages with {len(self.free_pages)} free")
        return [self.free_pages.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self.free_pages.extend(reversed(pages))
