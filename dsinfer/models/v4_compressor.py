"""The DeepSeek-V4 KV compressor (spec section 2.8): every `ratio` tokens become one compressed entry.

Per channel c, entry w pools its window with a softmax over the tokens' gate scores plus a learned position bias:
C_w[c] = sum_j softmax_j(Z[j, c] + ape[j, c]) V[j, c]. With overlap (CSA, ratio 4) the projections are twice as
wide: the first half of window w-1 and the second half of window w form 2 * ratio slots, so an entry spans
8 tokens with stride 4. The pooled entry is RMS-normalised, rotated at the position of its window's first token
and, in the QAT simulation, rounded as the reference rounds it (FP8 on the non-rotary dims; for the indexer,
Hadamard then FP4). The projections and the pooling run in float32, as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.v4_compress import (
    compress_decode,
    compress_decode_torch,
    compress_pool,
    compress_pool_torch,
    finish_torch,
)
from .layers import RMSNorm
from .v4_state import CompressorState, V4DecodeBatch


class Compressor(nn.Module):
    def __init__(self, dim: int, head_dim: int, rope_head_dim: int, ratio: int, overlap: bool, rotate: bool,
                 norm_eps: float):
        super().__init__()
        self.head_dim, self.rope_head_dim, self.ratio = head_dim, rope_head_dim, ratio
        self.overlap, self.rotate = overlap, rotate     # rotate: the indexer's compressor (Hadamard, FP4 QAT)
        width = (2 if overlap else 1) * head_dim
        self.ape = nn.Parameter(torch.zeros(ratio, width, dtype=torch.float32), requires_grad=False)
        self.wkv = _Fp32Weight(dim, width)
        self.wgate = _Fp32Weight(dim, width)
        self.wkv_gate: _Fp32Weight | None = None      # wkv and wgate as one GEMM (fuse_projections)
        self.norm = RMSNorm(head_dim, norm_eps)
        self.attn_backend = "torch"       # or "triton": the pooling kernel (layers.set_attn_backend)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (T, D), any tokens (a whole batch at once) -> their kv and gate-score projections, (T, width) each,
        float32."""
        xf = x.float()
        if self.wkv_gate is not None:                  # column slices of one projection: rows 2 width apart
            return F.linear(xf, self.wkv_gate.weight).chunk(2, dim=-1)
        return F.linear(xf, self.wkv.weight.float()), F.linear(xf, self.wgate.weight.float())

    def fuse_projections(self) -> bool:
        """Stack wkv and wgate (both read the layer input, in float32) into one weight: one GEMM a step instead of
        two. Returns whether it fused."""
        if self.wkv_gate is not None:
            return False
        stacked = torch.cat([self.wkv.weight, self.wgate.weight]).float()
        self.wkv_gate = _Fp32Weight(stacked.shape[1], stacked.shape[0], stacked)
        del self.wkv, self.wgate
        return True

    def forward(self, x: torch.Tensor, start_pos: int, state: CompressorState, rope_table: torch.Tensor,
                simulate_qat: bool, projected: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: (S, D), the tokens at positions start_pos.. of one sequence (`projected`: their `project(x)`, if
        the batch's was computed at once). Updates `state` and returns every finished entry of the sequence,
        (n, head_dim) in x's dtype."""
        m, d = self.ratio, self.head_dim
        S = x.shape[0]
        kv, score = projected if projected is not None else self.project(x)         # (S, width) each
        slot = torch.arange(start_pos, start_pos + S, device=x.device) % m
        score = score + self.ape[slot]
        first = start_pos // m                         # window index of the first buffered token
        held = state.buffered(start_pos)
        if held is not None:
            kv, score = torch.cat([held[0], kv]), torch.cat([held[1], score])
        usable = kv.shape[0] // m * m
        n = usable // m
        prev = state.previous(start_pos) if self.overlap and n else None
        kv_rest, score_rest = kv[usable:], score[usable:]
        width = kv.shape[-1]
        kv, score = kv[:usable].view(n, m, width), score[:usable].view(n, m, width)   # (n, m, width)
        last = (kv[-1, :, :d], score[-1, :, :d]) if self.overlap and n else None
        if self.overlap and n:                         # (prev is read before `keep` may overwrite it)
            prev_kv = kv.new_zeros(1, m, d) if prev is None else prev[0][None]
            prev_score = score.new_full((1, m, d), float("-inf")) if prev is None else prev[1][None]
            kv = torch.cat([torch.cat([prev_kv, kv[:-1, :, :d]]), kv[..., d:]], dim=1)              # (n, 2m, d)
            score = torch.cat([torch.cat([prev_score, score[:-1, :, :d]]), score[..., d:]], dim=1)
        state.keep(kv_rest, score_rest, last)
        if n == 0:
            return state.read_entries(first) if first else x.new_zeros(0, d)
        # softmax pool over the window -> RMSNorm -> rotary at each window's first token (kernels/v4_compress.py)
        positions = (first + torch.arange(n, device=x.device)) * m
        entries = self._pool(kv, score, rope_table[positions], simulate_qat, x.dtype)   # (n, d)
        state.add_entries(entries, first)
        return state.read_entries(first + n)

    def decode(self, x: torch.Tensor, batch: V4DecodeBatch, store, rope_table: torch.Tensor, simulate_qat: bool,
               projected: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """One new token per sequence (x: (B, D) at batch.positions): buffer its projections in `store`
        (engine/v4_cache.py DecodeCompressorStore: every sequence's buffers and entries); where it completes a
        window (p + 1 divisible by ratio), pool the window into entry p // ratio and store it there. One kernel
        (kernels/v4_compress.py compress_decode) or its twin, without a host value (a CUDA graph cannot branch on
        positions)."""
        kv, score = projected if projected is not None else self.project(x)         # (B, width) each
        decode = compress_decode if self.attn_backend == "triton" else compress_decode_torch
        decode(kv, score, self.ape, batch.positions, batch.slots, store.kv, store.score,
               store.prev_kv, store.prev_score, self.norm.weight, rope_table, store.entries,
               batch.entry_rows[self.ratio], self.norm.eps, self.rotate, simulate_qat)

    def _pool(self, kv: torch.Tensor, score: torch.Tensor, cos_sin: torch.Tensor, simulate_qat: bool,
              dtype: torch.dtype) -> torch.Tensor:
        """Windows (n, slots, d) -> entries (n, d): softmax pool, RMSNorm and rotary (kernels/v4_compress.py),
        then the Hadamard rotation (indexer) and the QAT rounding."""
        pool = compress_pool if self.attn_backend == "triton" else compress_pool_torch
        entries = pool(kv.contiguous(), score.contiguous(), self.norm.weight, cos_sin.contiguous(), self.norm.eps,
                       dtype)
        return finish_torch(entries, self.rope_head_dim, self.rotate, simulate_qat)


class _Fp32Weight(nn.Module):
    """A projection weight the reference keeps in float32 (compressor wkv / wgate): (out, in)."""

    def __init__(self, in_features: int, out_features: int, weight: torch.Tensor | None = None):
        super().__init__()
        if weight is None:
            weight = torch.empty(out_features, in_features, dtype=torch.float32)
        self.weight = nn.Parameter(weight, requires_grad=False)
