"""What DeepSeek-V4 keeps per sequence between forward passes, and how a ragged batch is described.

Per layer: the last window_size - 1 key/value rows (a query at position p sees rows p - window_size + 1 .. p),
and for compressed layers the compressor state: the projections of the tokens of the unfinished window, the
first half of the last finished window (overlapping CSA windows reach one window back) and the finished
compressed entries. CSA layers hold the same again for the indexer's own compressor (its entries are the
indexer keys). Prefill and decode are one code path: any number of new tokens continues from this state.

The model reads and writes the state only through the methods below, given positions, so the storage can
differ: here it is growing tensors of one sequence (the plain path, and the engine's test oracle); the engine
keeps the same state in fixed slots and pages (engine/v4_cache.py). Everything stored is a function of the
positions, so a store never needs resetting: a sequence that starts again at position 0 reads nothing old.
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

    def buffered(self, start_pos: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(kv, score) of the start_pos % ratio tokens of the unfinished window, or None if there are none."""
        return None if self.kv is None or self.kv.shape[0] == 0 else (self.kv, self.score)

    def previous(self, start_pos: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Overlap: (kv, score) first halves of window start_pos // ratio - 1, or None before the first."""
        return None if self.prev_kv is None else (self.prev_kv, self.prev_score)

    def keep(self, kv: torch.Tensor, score: torch.Tensor, prev: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Store the unfinished window's rows (they start at a window boundary) and, if a window finished,
        its first halves."""
        self.kv, self.score = kv, score
        if prev is not None:
            self.prev_kv, self.prev_score = prev

    def add_entries(self, entries: torch.Tensor, first: int) -> None:
        """Append entries first, first + 1, ...: (n, d)."""
        assert first == self.num_entries, "compressor state out of step with the sequence"
        self.entries = entries if self.entries is None else torch.cat([self.entries, entries])

    def read_entries(self, n: int) -> torch.Tensor:
        """Entries 0 .. n - 1, (n, d); n > 0."""
        return self.entries[:n]


@dataclass
class LayerState:
    window: torch.Tensor | None = None     # (<= window_size - 1, head_dim): the latest key/value rows
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None

    def past_window(self, start_pos: int) -> torch.Tensor | None:
        """The rows of positions max(0, start_pos - window_size + 1) .. start_pos - 1, or None at position 0."""
        return self.window

    def keep_window(self, rows: torch.Tensor, end_pos: int) -> None:
        """Remember rows (<= window_size - 1 of them), the last of which is position end_pos - 1."""
        self.window = rows


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


@dataclass
class V4DecodeBatch:
    """B sequences with one new token each, decoded against stores that hold every sequence's state at once (the
    engine's slots and pages, engine/v4_cache.py: `layers[i]` is layer i's store). Everything is a device tensor,
    so a decode step needs no host values and can be a CUDA graph; rows that complete no window still pool one,
    and the stores send such writes to scratch."""

    token_ids: torch.Tensor                # (B,) int64 (hash routing reads them)
    positions: torch.Tensor                # (B,) int64: the new token's position
    slots: torch.Tensor                    # (B,) int64: each sequence's state slot
    window_rows: torch.Tensor              # (B, window_size) int64: pool rows of positions p, p - 1, .. (-1 < 0)
    entry_rows: dict[int, torch.Tensor]    # ratio m -> (B, E_m) int64: where entry w of row b lies among a layer's
                                           # entry rows; E_m > every row's p // m
    layers: list = field(default_factory=list)
    _derived: dict = field(default_factory=dict, repr=False)

    def memo(self, key, make):
        """A tensor of this step that many layers derive alike from the batch (visible entries per ratio, pool rows):
        made by the first layer that asks, `make()`, and shared by the rest (inside a CUDA graph capture too: the
        batch is built per forward)."""
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]
