"""What one forward pass needs to know about the batch it runs (the engine fills it, the layers read it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """A flat batch of T new tokens from B sequences, each sequence's tokens contiguous.

    Sequence b contributes rows query_start_loc[b]..query_start_loc[b+1]-1, which are the last tokens of its
    context of context_lens[b] tokens (cached prefix + these). The host-side lists drive the PyTorch attention;
    tensors are on the model's device.
    """

    positions: torch.Tensor          # (T,) int64: position of each new token in its sequence
    slot_mapping: torch.Tensor       # (T,) int64: cache row (page * page_size + offset) each new token writes
    block_tables: torch.Tensor       # (B, max_pages) int32: the pages of each sequence, in order
    query_start_loc: list[int]       # B + 1 offsets into the T rows
    context_lens: list[int]          # B: tokens each sequence attends to, new ones included
    cu_seqlens_q: torch.Tensor       # (B + 1,) int32: query_start_loc on the device (for kernels)
    seq_lens: torch.Tensor           # (B,) int32: context_lens on the device
    max_query_len: int               # largest number of new tokens of one sequence
    max_seq_len: int                 # largest context length

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)
