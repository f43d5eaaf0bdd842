"""ModelRunner: turns scheduled sequences into one flat batch, runs the model, returns logits.

A step is built on the host as a `StepBatch` (plain lists: what rank 0 sends to the other ranks under tensor
parallelism) and executed on the device by `execute`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models import AttentionMetadata
from .cuda_graph import CudaGraphRunner
from .kv_cache import KVCache
from .sequence import PENDING, Sequence, fill_pending


@dataclass
class StepBatch:
    """One forward pass, host side: T new tokens from B sequences, each sequence's tokens contiguous."""

    input_ids: list[int]            # T
    positions: list[int]            # T
    slot_mapping: list[int]         # T: cache row (page * page_size + offset) each new token writes
    block_tables: list[list[int]]   # B rows, padded with page 0 to one width
    query_start_loc: list[int]      # B + 1
    context_lens: list[int]         # B
    all_logits: bool = False        # logits for every new token, not just each sequence's last
    pending_pos: list[int] = field(default_factory=list)    # input ids still PENDING (sampled on the device) ...
    pending_rows: list[int] = field(default_factory=list)   # ... and their rows in the previous step's tokens

    @property
    def is_decode(self) -> bool:
        return len(self.input_ids) == len(self.context_lens)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: KVCache, device: torch.device):
        self.model, self.cache, self.device = model, cache, device
        self.page_size = cache.page_size
        self.graphs: CudaGraphRunner | None = None

    def capture_cuda_graphs(self, max_batch: int, max_seq_len: int) -> None:
        """Record decode steps of up to max_batch sequences as CUDA graphs (see cuda_graph.py)."""
        self.graphs = CudaGraphRunner(self.model, self.cache.layers, self.cache.scratch_page, self.page_size,
                                      max_batch, max_seq_len, self.device)
        self.graphs.capture()

    def build(self, seqs: list[Sequence], num_new: list[int], all_logits: bool = False) -> StepBatch:
        """The next num_new[i] uncached tokens of each sequence."""
        page_size = self.page_size
        ids, positions, slots, starts, context_lens = [], [], [], [0], []
        pending_pos, pending_rows = [], []
        for seq, n in zip(seqs, num_new):
            begin, end = seq.num_cached_tokens, seq.num_cached_tokens + n
            if seq.token_ids[end - 1] == PENDING:          # only a sequence's last token can be
                pending_pos.append(len(ids) + n - 1)
                pending_rows.append(seq.pending_row)
            ids += seq.token_ids[begin:end]
            positions += range(begin, end)
            slots += [seq.block_table[p // page_size] * page_size + p % page_size for p in range(begin, end)]
            starts.append(starts[-1] + n)
            context_lens.append(end)
        width = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return StepBatch(ids, positions, slots, tables, starts, context_lens, all_logits, pending_pos, pending_rows)

    def metadata(self, batch: StepBatch) -> tuple[torch.Tensor, AttentionMetadata]:
        """Input ids and attention metadata on the device."""
        to = dict(device=self.device)
        attn = AttentionMetadata(
            positions=torch.tensor(batch.positions, dtype=torch.int64, **to),
            slot_mapping=torch.tensor(batch.slot_mapping, dtype=torch.int64, **to),
            block_tables=torch.tensor(batch.block_tables, dtype=torch.int32, **to),
            query_start_loc=batch.query_start_loc, context_lens=batch.context_lens,
            cu_seqlens_q=torch.tensor(batch.query_start_loc, dtype=torch.int32, **to),
            seq_lens=torch.tensor(batch.context_lens, dtype=torch.int32, **to),
            max_query_len=max(b - a for a, b in zip(batch.query_start_loc, batch.query_start_loc[1:])),
            max_seq_len=max(batch.context_lens))
        return torch.tensor(batch.input_ids, dtype=torch.int64, **to), attn

    @torch.inference_mode()
    def execute(self, batch: StepBatch, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (float32) of each sequence's last new token, (B, V); or of every new token, (T, V).
        prev_tokens: the previous step's sampled tokens on the device, for the batch's PENDING input ids."""
        if (batch.is_decode and self.graphs is not None
                and self.graphs.can_run(len(batch.context_lens), max(batch.context_lens))):
            return self.graphs.run(batch.input_ids, batch.positions, batch.slot_mapping, batch.context_lens,
                                   batch.block_tables, (batch.pending_pos, batch.pending_rows, prev_tokens))
        input_ids, attn = self.metadata(batch)
        fill_pending(input_ids, batch.pending_pos, batch.pending_rows, prev_tokens)
        hidden = self.model(input_ids, self.cache.layers, attn)
        if not batch.all_logits and not batch.is_decode:
            hidden = hidden[torch.tensor(batch.query_start_loc[1:], device=self.device) - 1]
        return self.model.compute_logits(hidden)

    def run(self, seqs: list[Sequence], num_new: list[int], all_logits: bool = False,
            prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        return self.execute(self.build(seqs, num_new, all_logits), prev_tokens)
