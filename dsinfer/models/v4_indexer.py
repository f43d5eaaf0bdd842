"""The DeepSeek-V4 lightning indexer (CSA layers; spec section 2.8): picks the compressed entries each query
attends to. I[s, t] = sum_h w[s, h] * relu(q_h(s) . K_t) with w = weights_proj(x) / sqrt(index_head_dim *
index_n_heads); keys K are the entries of the indexer's own (overlapping, Hadamard-rotated) compressor. Queries
are rotated with the compressed-layer RoPE, Hadamard-rotated and (QAT simulation) rounded to FP4. A query at
position p may pick entry t only if t < (p + 1) // ratio; it keeps the top index_topk of those.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.fp4 import fp4_act_quant_dequant_torch
from ..kernels.v4_compress import hadamard
from ..kernels.v4_indexer import indexer_scores_rows, indexer_scores_rows_torch, indexer_topk, indexer_topk_torch
from .args_v4 import ModelArgsV4
from .layers import Linear
from .rope import apply_rotary
from .v4_compressor import Compressor
from .v4_state import CompressorState, V4DecodeBatch


def visible_entries(n: int, positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """Every finished entry a query at each position may read, (S, n) int64, -1 where not yet visible (entry w
    is visible from position (w + 1) * ratio - 1 on)."""
    every = torch.arange(n, device=positions.device)[None]
    return every.masked_fill(every >= ((positions + 1) // ratio)[:, None], -1)


class Indexer(nn.Module):
    def __init__(self, args: ModelArgsV4, ratio: int):
        super().__init__()
        block = args.quant.block_size if args.quant else (128, 128)
        self.n_heads, self.head_dim, self.topk, self.ratio = args.index_n_heads, args.index_head_dim, \
            args.index_topk, ratio
        self.rope_head_dim = args.rope_head_dim
        self.wq_b = Linear(args.q_lora_rank, self.n_heads * self.head_dim, block)
        self.weights_proj = Linear(args.dim, self.n_heads)
        self.attn_backend = "torch"       # or "triton": the scoring kernel (layers.set_attn_backend)
        self.compressor = Compressor(args.dim, self.head_dim, args.rope_head_dim, ratio, overlap=True, rotate=True,
                                     norm_eps=args.norm_eps)

    def project(self, x: torch.Tensor, qr: torch.Tensor, positions: torch.Tensor, rope_table: torch.Tensor,
                simulate_qat: bool, score: bool = True) -> tuple:
        """Any tokens (a whole batch at once): x (T, D), qr (T, q_lora) at `positions` -> queries (T, H, d)
        rotated, Hadamard-transformed (FP4-rounded under QAT), head weights (T, H) float32, and the compressor's
        projections. score=False (no sequence has more than index_topk entries, so every visible one is picked):
        the compressor's projections only, queries and weights None."""
        if not score:
            return None, None, self.compressor.project(x)
        T = x.shape[0]
        q = self.wq_b(qr).view(T, self.n_heads, self.head_dim)
        rd = self.rope_head_dim
        q = torch.cat([q[..., :-rd], apply_rotary(q[..., -rd:], rope_table[positions])], dim=-1)
        q = hadamard(q)
        if simulate_qat:
            q = fp4_act_quant_dequant_torch(q)
        w = self.weights_proj(x).float() * (self.head_dim * self.n_heads) ** -0.5          # (T, H)
        return q, w, self.compressor.project(x)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, start_pos: int, state: CompressorState,
                rope_table: torch.Tensor, simulate_qat: bool, projected: tuple | None = None) -> torch.Tensor:
        """One sequence: x (S, D), qr (S, q_lora) at positions start_pos.. (`projected`: their `project`, if the
        batch's was computed at once). Returns the compressed entries each query attends to, (S, min(index_topk,
        n)) int64 indices into the n entries finished so far, -1 where fewer are visible."""
        S = x.shape[0]
        positions = torch.arange(start_pos, start_pos + S, device=x.device)
        q, w, kv_score = projected if projected is not None else self.project(x, qr, positions, rope_table,
                                                                               simulate_qat)
        keys = self.compressor(x, start_pos, state, rope_table, simulate_qat, kv_score)   # (n, head_dim)
        n = keys.shape[0]
        if n <= self.topk:                      # the top-k of n <= k entries is every visible one: no scoring
            return visible_entries(n, positions, self.ratio)
        # I[s, t] = sum_h w[s, h] relu(q_h . K_t) over the visible entries, then the top-k (kernels/v4_indexer.py).
        # Ties (ReLU makes scores exactly 0) are broken as topk breaks them, as in HF and the reference; topk's
        # choice among ties can depend on the row length, so batched and alone may then pick different entries.
        topk = indexer_topk if self.attn_backend == "triton" else indexer_topk_torch
        return topk(q.contiguous(), keys.contiguous(), w.contiguous(), positions, self.ratio, self.topk)

    def decode(self, x: torch.Tensor, qr: torch.Tensor, batch: V4DecodeBatch, store, rope_table: torch.Tensor,
               simulate_qat: bool) -> torch.Tensor:
        """One new token per sequence (x (B, D), qr (B, q_lora) at batch.positions), its indexer state in `store`
        (engine/v4_cache.py DecodeCompressorStore). Returns the entries each query attends to, (B, min(index_topk,
        E)) int64, as `forward` picks them: every visible one in order while a sequence has at most index_topk,
        else the top index_topk by score (E = batch.entry_rows[ratio].shape[1] bounds the entries of any row)."""
        p = batch.positions
        rows = batch.entry_rows[self.ratio]                                           # (B, E)
        E = rows.shape[1]
        q, w, kv_score = self.project(x, qr, p, rope_table, simulate_qat, score=E > self.topk)
        self.compressor.decode(x, batch, store, rope_table, simulate_qat, kv_score)
        k = min(E, self.topk)                                  # (B, k), -1 = not yet; alike in every CSA layer
        every = batch.memo(("visible", self.ratio, k), lambda: visible_entries(k, p, self.ratio))
        if E <= self.topk:                   # no row can have more than index_topk entries: no scoring
            return every
        scores = indexer_scores_rows if self.attn_backend == "triton" else indexer_scores_rows_torch
        top = scores(q.contiguous(), store.entries, rows, w.contiguous(), p, self.ratio).topk(self.topk, dim=-1)
        few = batch.memo(("few", self.ratio, self.topk), lambda: ((p + 1) // self.ratio <= self.topk)[:, None])
        return torch.where(few, every, top.indices)
