"""Multi-head latent attention (DeepSeek V2/V3): queries through an optional low-rank projection, keys and
values through a shared 512-dim latent plus one 64-dim rotary key; the cache holds only latent + rotary key.

Two mathematically equal forms (see the spec, section 2.4):
- absorbed (default): W_UK folds into the query and W_UV into the output, attention runs in latent space;
- naive (test oracle): every cached latent is expanded into per-head keys and values.

Under tensor parallelism each rank runs n_heads / n of the heads (wq / wq_b and wkv_b split by rows, wo by
columns, summed over the ranks). The latent projection wkv_a is not split, so every rank writes the same latent
into its own cache.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import mla_attention_torch, mla_naive_attention_torch
from ..kernels.cache_write import norm_rope_store, store_latent_torch
from ..kernels.mla_triton import mla_attention as mla_attention_triton
from ..parallel import ParallelState
from .args import ModelArgs
from .batch import AttentionMetadata
from .layers import ColumnParallelLinear, Linear, RMSNorm, RowParallelLinear, stack_linears
from .rope import apply_rotary

ATTN_IMPLS = ("absorb", "naive")
class MLA(nn.Module):
    def __init__(self, args: ModelArgs, attn_impl: str = "absorb", parallel: ParallelState | None = None):
        super().__init__()
        parallel = parallel or ParallelState.single()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"unknown attention implementation {attn_impl!r}; choose one of {ATTN_IMPLS}")
        self.attn_impl = attn_impl
        self.attn_backend = "torch"
        self.n_heads = parallel.split(args.n_heads, "num_attention_heads")    # this rank's heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = args.qk_nope_head_dim, args.qk_rope_head_dim
        self.v_head_dim = args.v_head_dim
        self.softmax_scale = args.softmax_scale
        block = args.quant.block_size if args.quant else (128, 128)
        qk_head_dim = args.qk_head_dim
        if self.q_lora_rank == 0:
            self.wq = ColumnParallelLinear(args.dim, args.n_heads * qk_head_dim, parallel, block)
        else:
            self.wq_a = Linear(args.dim, self.q_lora_rank, block)
            self.q_norm = RMSNorm(self.q_lora_rank, args.norm_eps)
            self.wq_b = ColumnParallelLinear(self.q_lora_rank, args.n_heads * qk_head_dim, parallel, block)
        self.wkv_a = Linear(args.dim, self.kv_lora_rank + self.qk_rope_head_dim, block)
        self.kv_norm = RMSNorm(self.kv_lora_rank, args.norm_eps)
        self.wkv_b = ColumnParallelLinear(self.kv_lora_rank, args.n_heads * (self.qk_nope_head_dim + self.v_head_dim),
                                          parallel, block)
        self.wo = RowParallelLinear(args.n_heads * self.v_head_dim, args.dim, parallel, block)
        self.wqkv_a: Linear | None = None      # wq_a (or wq) and wkv_a as one GEMM (fuse_input_projections)

    def fuse_input_projections(self) -> bool:
        """Stack the two projections of the layer input, wq_a (wq without a query LoRA) and wkv_a, into one
        linear layer: one GEMM and one activation quantization fewer per layer, and a wider GEMM that keeps more
        of the GPU streaming at decode. Not where wq is split over tensor-parallel ranks (wkv_a is whole on
        each), the formats differ, or FP8 blocks would straddle the seam. Returns whether it fused."""
        q, kv = (self.wq if self.q_lora_rank == 0 else self.wq_a), self.wkv_a
        if self.wqkv_a is not None or (isinstance(q, ColumnParallelLinear) and q.parallel.world_size > 1):
            return False
        fused = stack_linears(q, kv)
        if fused is None:
            return False
        self.wqkv_a, self.wqkv_a_split = fused, [q.out_features, kv.out_features]
        del self.wkv_a
        if self.q_lora_rank == 0:
            del self.wq
        else:
            del self.wq_a
        return True

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor, kv_cache: torch.Tensor,
                attn: AttentionMetadata) -> torch.Tensor:
        """x: (T, D); cos_sin: (T, rope/2, 2); kv_cache: (pages, page_size, kv_lora + rope). Returns (T, D)."""
        T = x.shape[0]
        if self.wqkv_a is not None:
            q, kv = self.wqkv_a(x).split(self.wqkv_a_split, dim=-1)
            q = q if self.q_lora_rank == 0 else self.wq_b(self.q_norm(q))
        else:
            q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
            kv = self.wkv_a(x)                                                # (T, kv_lora + rope)
        q = q.view(T, self.n_heads, -1)                                       # (T, H, nope + rope)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        triton_backend = self.attn_backend == "triton"
        if triton_backend:
            from ..kernels.norm_rope_triton import rotary as rotate
        else:
            rotate = apply_rotary
        rope_in_attention = triton_backend and self.attn_impl == "absorb"   # the attention kernel rotates q_pe
        if not rope_in_attention:
            q_pe = rotate(q_pe, cos_sin)

        if triton_backend:             # kv_norm, the key's rotation and the cache write in one launch
            norm_rope_store(kv_cache, attn.slot_mapping, kv, self.kv_norm.weight, self.kv_norm.eps, cos_sin)
        else:
            c, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
            c = self.kv_norm(c)
            k_pe = rotate(k_pe.unsqueeze(1), cos_sin).squeeze(1)
            store_latent_torch(kv_cache, attn.slot_mapping, c, k_pe)

        wkv_b = self.wkv_b.dense(x.dtype).view(self.n_heads, -1, self.kv_lora_rank)   # (H, nope + v, R)
        if self.attn_impl == "absorb":
            q_latent = torch.einsum("thd,hdr->thr", q_nope, wkv_b[:, :self.qk_nope_head_dim])   # (T, H, R)
            if triton_backend:
                o = mla_attention_triton(q_latent, q_pe, kv_cache, attn.block_tables, attn.cu_seqlens_q,
                                         attn.seq_lens, self.softmax_scale, attn.max_query_len, attn.max_seq_len,
                                         cos_sin=cos_sin)
            else:
                o = mla_attention_torch(q_latent, q_pe, kv_cache, attn.block_tables, attn.query_start_loc,
                                        attn.context_lens, self.softmax_scale)                # (T, H, R)
            o = torch.einsum("thr,hdr->thd", o, wkv_b[:, self.qk_nope_head_dim:])              # (T, H, v)
        else:
            o = mla_naive_attention_torch(q_nope, q_pe, kv_cache, attn.block_tables, attn.query_start_loc,
                                          attn.context_lens, self.softmax_scale, wkv_b)
        return self.wo(o.flatten(1))


def fuse_input_projections(model: nn.Module) -> int:
    """MLA.fuse_input_projections on every MLA layer of `model`; returns how many fused."""
    return sum(m.fuse_input_projections() for m in model.modules() if isinstance(m, MLA))
