"""The paged latent cache: per layer, (num_pages, page_size, kv_lora_rank + qk_rope_head_dim) values.
Which sequence owns which page is the BlockManager's business."""

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
        self.scratch_page = num_pages       # one extra page, never handed out: padding rows of CUDA graphs use it
        # Rows are only read after they are written, so the pages need no initialisation.
        self.layers = [torch.empty(num_pages + 1, page_size, args.kv_cache_dim, dtype=dtype, device=device)
                       for _ in range(args.n_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)
