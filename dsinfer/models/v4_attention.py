"""DeepSeek-V4 attention (spec section 2.8): shared-KV multi-query attention over a sliding window, plus
compressed entries on CSA / HCA layers.

- Queries: wq_a -> q_norm -> wq_b, split into heads, each head RMS-normalised (no weight), the last
  rope_head_dim channels rotated at the token's position.
- One K=V head: wkv -> kv_norm, rotated the same way; the QAT simulation rounds its non-rotary dims to FP8.
- A query at position p attends to the raw rows p - window_size + 1 .. p, and on compressed layers to the
  finished entries: all of them (HCA) or the indexer's top-k (CSA); an entry w is visible once its window is
  complete (w < (p + 1) // ratio).
- Softmax with a per-head sink logit (added unscaled in float32), values = keys (all head_dim channels).
- The output's rotary part is rotated back (conjugate) at the query position; then the grouped low-rank
  projection: heads in o_groups groups, each group through its own block of wo_a, then wo_b.
Sliding layers use plain RoPE; compressed layers (attention, compressor and indexer alike) the YaRN one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.v4_compress import KV_QAT_BLOCK
from ..kernels.v4_rope import head_rope, head_rope_torch
from ..kernels.v4_sparse_attention import sparse_attention, sparse_attention_torch
from .args_v4 import CSA, SLIDING, ModelArgsV4
from .layers import Linear, RMSNorm, stack_linears
from .v4_compressor import Compressor
from .v4_indexer import Indexer, visible_entries
from .v4_state import CompressorState, LayerState, V4Batch, V4DecodeBatch


def _take(t, rows: slice):
    """A tensor, or a (nested) tuple of them (or None), cut to `rows` along the first dim."""
    if t is None:
        return None
    return tuple(_take(u, rows) for u in t) if isinstance(t, tuple) else t[rows]


class Attention(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgsV4):
        super().__init__()
        block = args.quant.block_size if args.quant else (128, 128)
        self.n_heads, self.head_dim, self.rope_head_dim = args.n_heads, args.head_dim, args.rope_head_dim
        self.window_size, self.eps, self.softmax_scale = args.window_size, args.norm_eps, args.softmax_scale
        self.o_groups, self.o_lora_rank = args.o_groups, args.o_lora_rank
        self.kind, self.ratio = args.attn_types[layer_id], args.compress_ratios[layer_id]
        self.rope_kind = "main" if self.kind == SLIDING else "compress"
        self.simulate_qat = True
        self.attn_backend = "torch"       # or "triton": the sparse-attention kernel (layers.set_attn_backend)

        self.attn_sink = nn.Parameter(torch.zeros(self.n_heads, dtype=torch.float32), requires_grad=False)
        self.wq_a = Linear(args.dim, args.q_lora_rank, block)
        self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps)
        self.wq_b = Linear(args.q_lora_rank, self.n_heads * self.head_dim, block)
        self.wkv = Linear(args.dim, self.head_dim, block)
        self.kv_norm = RMSNorm(self.head_dim, args.norm_eps)
        self.wqkv: Linear | None = None        # wq_a and wkv as one GEMM (fuse_input_projections)
        self.wo_a = Linear(self.n_heads * self.head_dim // self.o_groups, self.o_groups * self.o_lora_rank, block)
        self.wo_b = Linear(self.o_groups * self.o_lora_rank, args.dim, block)
        if self.kind != SLIDING:
            self.compressor = Compressor(args.dim, self.head_dim, self.rope_head_dim, self.ratio,
                                         overlap=self.kind == CSA, rotate=False, norm_eps=args.norm_eps)
        self.indexer = Indexer(args, self.ratio) if self.kind == CSA else None

    def fuse_input_projections(self) -> bool:
        """Stack wq_a and wkv (both read the layer input) into one linear layer: one GEMM (at decode one
        matrix-vector launch) and one activation quantization fewer per layer; and each compressor's two float32
        projections into one. Returns whether it fused."""
        for compressor in (getattr(self, "compressor", None), self.indexer and self.indexer.compressor):
            if compressor is not None:
                compressor.fuse_projections()
        fused = None if self.wqkv is not None else stack_linears(self.wq_a, self.wkv)
        if fused is None:
            return False
        self.wqkv, self.wqkv_split = fused, [self.wq_a.out_features, self.wkv.out_features]
        del self.wq_a, self.wkv
        return True

    def new_state(self) -> LayerState:
        return LayerState(compressor=CompressorState() if self.kind != SLIDING else None,
                          indexer=CompressorState() if self.indexer is not None else None)

    def forward(self, x: torch.Tensor, batch: V4Batch, states: list[LayerState],
                rope_table: torch.Tensor) -> torch.Tensor:
        """x: (T, D) normalised sublayer input of the flat batch; rope_table: (positions, rope/2, 2) of this
        layer's RoPE. Updates each sequence's state; returns (T, D)."""
        q, kv, qr, cos_sin = self._project(x, batch.positions, rope_table)

        # Projections for the whole batch at once; then, sequence by sequence, the stateful parts (compressor
        # windows, indexer, window rows), each sequence's keys gathered into one pool for one attention launch.
        comp = self.compressor.project(x) if self.kind != SLIDING else None
        idx = None
        if self.indexer is not None:                # queries are scored only where some sequence has > top-k entries
            most = max(p0 + n for p0, n in zip(batch.start_pos, batch.lengths)) // self.ratio
            idx = self.indexer.project(x, qr, batch.positions, rope_table, self.simulate_qat, most > self.indexer.topk)
        pools, index_rows, offset = [], [], 0
        for b, state in enumerate(states):
            rows, p0 = batch.rows(b), batch.start_pos[b]
            entries, picked = None, None
            if self.kind != SLIDING:
                entries = self.compressor(x[rows], p0, state.compressor, rope_table, self.simulate_qat,
                                          _take(comp, rows))
                if self.indexer is not None:
                    picked = self.indexer(x[rows], qr[rows], p0, state.indexer, rope_table, self.simulate_qat,
                                          _take(idx, rows))
                else:                                                               # HCA: every visible entry
                    picked = visible_entries(entries.shape[0], batch.positions[rows], self.ratio)
            keys, indices = self._gather(kv[rows], p0, state, entries, picked)
            pools.append(keys)
            index_rows.append(torch.where(indices >= 0, indices + offset, -1))
            offset += keys.shape[0]
        width = max(i.shape[1] for i in index_rows)
        indices = torch.cat([F.pad(i, (0, width - i.shape[1]), value=-1) for i in index_rows])
        pool = torch.cat(pools)                                                     # (all sequences' keys, d)
        return self._attend_and_project(q, pool, indices, cos_sin)

    def decode(self, x: torch.Tensor, batch: V4DecodeBatch, store, rope_table: torch.Tensor) -> torch.Tensor:
        """One new token per sequence: x (B, D) at batch.positions, every sequence's state in `store` (engine/
        v4_cache.py DecodeLayerStore, whose pool holds the window rows and entries of all of them). The same
        keys as `forward` in the same order (window rows newest first, then the entries), without a loop over
        sequences or a host value, so the step can be a CUDA graph. Returns (B, D)."""
        q, kv, qr, cos_sin = self._project(x, batch.positions, rope_table)
        store.write_window(kv, batch)
        indices = batch.window_rows                                                 # (B, W) pool rows
        if self.kind != SLIDING:
            self.compressor.decode(x, batch, store.compressor, rope_table, self.simulate_qat)
            rows = store.entry_pool_rows(batch)                                     # (B, E) pool rows of entries
            if self.indexer is not None:
                picked = self.indexer.decode(x, qr, batch, store.indexer, rope_table, self.simulate_qat)
                entries = torch.where(picked >= 0, rows.gather(1, picked.clamp(min=0)), -1)
                indices = torch.cat([indices, entries], dim=1)
            else:                                       # HCA: every visible entry (alike in every HCA layer)
                def hca(window=indices):
                    visible = visible_entries(rows.shape[1], batch.positions, self.ratio) >= 0
                    return torch.cat([window, torch.where(visible, rows, -1)], dim=1)
                indices = batch.memo(("hca_indices", self.ratio, store.entries_base), hca)
        return self._attend_and_project(q, store.pool, indices, cos_sin)

    def _head_rope(self):
        """The per-head norm / rotary / QAT epilogue (kernels/v4_rope.py): the kernel or its twin, by backend."""
        return head_rope if self.attn_backend == "triton" else head_rope_torch

    def _project(self, x: torch.Tensor, positions: torch.Tensor, rope_table: torch.Tensor) -> tuple:
        """x (T, D) at positions -> queries (T, H, head_dim), the key/value row (T, head_dim) (rotated, QAT-rounded),
        the query LoRA activation qr (T, q_lora) and the rotary table rows (T, rope/2, 2)."""
        T, rd = x.shape[0], self.rope_head_dim
        cos_sin = rope_table[positions]                                             # (T, rope/2, 2)
        if self.wqkv is not None:
            qa, kva = self.wqkv(x).split(self.wqkv_split, dim=-1)
        else:
            qa, kva = self.wq_a(x), self.wkv(x)
        qr = self.q_norm(qa)                                                        # (T, q_lora)
        rope = self._head_rope()
        # q: unweighted RMS norm per head, then the rotary; kv: the rotary, and the QAT rounding of the rest
        q = rope(self.wq_b(qr).view(T, self.n_heads, self.head_dim), cos_sin, rd, eps=self.eps)   # (T, H, d)
        kv = rope(self.kv_norm(kva), cos_sin, rd, qat_block=KV_QAT_BLOCK if self.simulate_qat else 0)
        return q, kv, qr, cos_sin

    def _attend_and_project(self, q: torch.Tensor, pool: torch.Tensor, indices: torch.Tensor,
                            cos_sin: torch.Tensor) -> torch.Tensor:
        """Sparse attention of q (T, H, d) over pool rows `indices` (T, K) (-1 = none), then the output side."""
        T, rd = q.shape[0], self.rope_head_dim
        if self.attn_backend == "triton":
            o = sparse_attention(q.contiguous(), pool.contiguous(), indices.to(torch.int32).contiguous(),
                                 self.attn_sink, self.softmax_scale)
        else:
            o = sparse_attention_torch(q, pool, indices, self.attn_sink, self.softmax_scale)     # (T, H, d)

        # Undo the rotation the values carried: rotate the output's rope part by minus the query angle.
        o = self._head_rope()(o, cos_sin, rd, inverse=True)
        z = self.wo_a.grouped(o.view(T, self.o_groups, -1), self.o_groups)         # (T, G, o_lora)
        return self.wo_b(z.flatten(1))

    def _gather(self, kv: torch.Tensor, p0: int, state: LayerState, entries: torch.Tensor | None,
                picked: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence: kv (S, d) new rows at positions p0..; entries (n, d) with picked (S, k) indices into them
        (-1 = none). Appends kv to the window state. Returns the keys the sequence's queries may read (its window
        rows, new rows and entries, (N, d)) and each query's indices into them (S, W [+ k]), -1 = none."""
        S, W = kv.shape[0], self.window_size
        past = state.past_window(p0)
        past = past if past is not None else kv.new_zeros(0, kv.shape[-1])
        keys = torch.cat([past, kv])                                                # (Wp + S, d)
        state.keep_window(keys[max(0, keys.shape[0] - (W - 1)):], p0 + S)
        # query s sees the rows of positions p0 + s - j, j < W: key index past.shape[0] + s - j where that is >= 0
        window = past.shape[0] + torch.arange(S, device=kv.device)[:, None] - torch.arange(W, device=kv.device)
        indices = window.masked_fill(window < 0, -1)                                # (S, W)
        if entries is not None and entries.shape[0]:
            indices = torch.cat([indices, torch.where(picked >= 0, picked + keys.shape[0], -1)], dim=1)
            keys = torch.cat([keys, entries])
        return keys, indices


def fuse_input_projections(model: nn.Module) -> int:
    """Attention.fuse_input_projections on every V4 attention layer of `model`; returns how many fused."""
    return sum(m.fuse_input_projections() for m in model.modules() if isinstance(m, Attention))
