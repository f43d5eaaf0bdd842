"""What DeepSeek-V4 keeps per sequence between forward passes, and how a ragged batch is described.

Per layer: the last window_size - 1 key/value rows (a query at position p sees rows p - window_size + 1 .. p),
and for compressed layers the compressor state: the projections of the tokens of the unfinished window, the
first half of the last finished window (overlapping CSA windows reach one window back) and the finished
compressed entries. CSA layers hold the same again for the indexer's own compressor (its entries are the
indexer keys). Prefill and decode are one code path: any number of new tokens continues from this state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CompressorState:
    kv: torch.Tensor | None = None         # (r < ratio, width) float32: projections of the unfinished window
    score: torch.Tensor | None = None      # (r, width) float32: their gate scores, position bias added
    prev_kv: torch.Tensor | None = None    # overlap only: (ratio, d) float32, first half of the last full window
    prev_score: torch.Tensor | None = None
    entries: torch.Tensor | None = None    # (n, d) model dtype: finished compressed entries, in order

    @property
    def num_entries(self) -> int:
        return 0 if self.entries is None else self.entries.shape[0]

    @property
    def num_buffered(self) -> int:
        return 0 if self.kv is None else self.kv.shape[0]


@dataclass
class LayerState:
    window: torch.Tensor | None = None     # (<= window_size - 1, head_dim): the latest key/value rows
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None


@dataclass
class V4State:
    """One sequence's state in every layer; `num_tokens` tokens have gone through the model."""

    layers: list[LayerState]
    num_tokens: int = 0


@dataclass
class V4Batch:
    """B sequences' new tokens, flat and contiguous per sequence: sequence b owns rows
    starts[b] .. starts[b] + lengths[b] - 1, at positions start_pos[b] onwards."""

    starts: list[int]
    lengths: list[int]
    start_pos: list[int]
    positions: torch.Tensor                # (T,) int64
    token_ids: torch.Tensor                # (T,) int64 (hash routing reads them)
    states: list[V4State] = field(default_factory=list)

    def rows(self, b: int) -> slice:
        return slice(self.starts[b], self.starts[b] + self.lengths[b])
