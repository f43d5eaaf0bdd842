"""The DeepSeek V2 / V3 family (V2, V2-Lite, V3, R1, V3.1) as one model, read top to bottom:
embedding -> n_layers x (MLA, then dense MLP or MoE, each pre-normed with a residual) -> norm -> LM head.

Tokens are flat: a batch is T new tokens from several sequences, described by AttentionMetadata.
"""

from __future__ import annotations

import torch
from torch import nn

from ..parallel import ParallelState
from .args import ModelArgs
from .batch import AttentionMetadata
from .layers import MLP, ColumnParallelLinear, Embedding, RMSNorm
from .mla import MLA
from .moe import MoE
from .rope import rope_cos_sin


class Block(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, attn_impl: str = "absorb",
                 parallel: ParallelState | None = None):
        super().__init__()
        block = args.quant.block_size if args.quant else (128, 128)
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = MLA(args, attn_impl, parallel)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn = (MoE(args, parallel) if args.is_moe_layer(layer_id)
                    else MLP(args.dim, args.inter_dim, block, parallel))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos_sin: torch.Tensor, kv_cache: torch.Tensor,
                attn: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """h = residual + x (the previous layer's output; the embedding itself at layer 0, residual None);
        h = h + attn(attn_norm(h)); returns (ffn(ffn_norm(h)), h): the last add is the next norm's (fused)."""
        if residual is None:
            y, residual = self.attn_norm(x), x
        else:
            y, residual = self.attn_norm(x, residual)
        y, residual = self.ffn_norm(self.attn(y, cos_sin, kv_cache, attn), residual)
        return self.ffn(y), residual


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, attn_impl: str = "absorb", parallel: ParallelState | None = None):
        """`parallel`: this process's slice under tensor and expert parallelism (None: the whole model)."""
        super().__init__()
        self.args = args
        self.parallel = parallel or ParallelState.single()
        self.embed = Embedding(args.vocab_size, args.dim, parallel)
        self.layers = nn.ModuleList(Block(i, args, attn_impl, parallel) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.head = ColumnParallelLinear(args.dim, args.vocab_size, parallel, gather_output=True)   # logits gathered
        self.rope_table: torch.Tensor | None = None   # (max_positions, rope/2, 2) float32, set by init_rope

    def init_rope(self, max_positions: int, device: torch.device) -> None:
        """Precompute cos/sin for positions [0, max_positions)."""
        self.rope_table = rope_cos_sin(self.args.rope, self.args.qk_rope_head_dim, max_positions, device)

    def forward(self, input_ids: torch.Tensor, kv_caches: list[torch.Tensor], attn: AttentionMetadata) -> torch.Tensor:
        """input_ids: (T,) -> final hidden states (T, D), normalised; kv_caches: one tensor per layer."""
        h = self.embed(input_ids)
        cos_sin = self.rope_table[attn.positions]
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            h, residual = layer(h, residual, cos_sin, kv_cache, attn)
        return self.norm(h, residual)[0]

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, vocab) float32."""
        return self.head(h).float()
