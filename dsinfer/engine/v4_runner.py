"""V4ModelRunner: the DeepSeek-V4 twin of ModelRunner. Turns scheduled sequences into one flat batch, runs the
V4 model over each sequence's state slot and pages (v4_cache.py), returns logits. Steps of one new token per
sequence take the model's batched decode path, replayed from CUDA graphs where they were captured
(v4_cuda_graph.py); steps with prompts take the per-sequence path."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from ..checkpoint.loader_v4 import load_model_v4
from ..config import EngineConfig
from ..models.args_v4 import ModelArgsV4
from ..models.deepseek_v4 import Transformer
from ..models.v4_state import V4State
from .sequence import PENDING, Sequence, fill_pending
from .v4_cache import V4Cache
from .v4_cuda_graph import V4CudaGraphRunner


@dataclass
class V4StepBatch:
    """One forward pass, host side: num_new[b] new tokens of sequence b, flat and contiguous per sequence."""

    input_ids: list[int]            # T
    num_new: list[int]              # B
    start_pos: list[int]            # B: position of each sequence's first new token (= tokens already cached)
    state_slots: list[int]          # B
    block_tables: list[list[int]]   # B rows (not padded)
    all_logits: bool = False        # logits for every new token, not just each sequence's last
    pending_pos: list[int] = field(default_factory=list)    # as in StepBatch
    pending_rows: list[int] = field(default_factory=list)


class V4ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: V4Cache, device: torch.device):
        self.model, self.cache, self.device = model, cache, device
        self.ratios = sorted({m for m in cache.ratios if m})
        self.graphs: V4CudaGraphRunner | None = None

    def capture_cuda_graphs(self, max_batch: int, max_seq_len: int) -> None:
        """Record decode steps of up to max_batch sequences as CUDA graphs (see v4_cuda_graph.py)."""
        self.graphs = V4CudaGraphRunner(self, max_batch, max_seq_len)
        self.graphs.capture()

    def build(self, seqs: list[Sequence], num_new: list[int], all_logits: bool = False) -> V4StepBatch:
        """The next num_new[i] uncached tokens of each sequence."""
        ids = [t for s, n in zip(seqs, num_new) for t in s.token_ids[s.num_cached_tokens:s.num_cached_tokens + n]]
        ends = list(itertools.accumulate(num_new))
        pending = [(end - 1, s.pending_row) for s, end in zip(seqs, ends) if ids[end - 1] == PENDING]
        return V4StepBatch(ids, list(num_new), [s.num_cached_tokens for s in seqs], [s.state_slot for s in seqs],
                           [list(s.block_table) for s in seqs], all_logits, [p for p, _ in pending],
                           [r for _, r in pending])

    @torch.inference_mode()
    def execute(self, batch: V4StepBatch, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (float32) of each sequence's last new token, (B, V); or of every new token, (T, V).
        prev_tokens: the previous step's sampled tokens on the device, for the batch's PENDING input ids.
        Steps of one new token per sequence run the batched decode path (a CUDA graph where one was captured)."""
        if all(n == 1 for n in batch.num_new):
            if self.graphs is not None and self.graphs.can_run(len(batch.num_new), max(batch.start_pos) + 1):
                return self.graphs.run(batch, prev_tokens)
            return self._decode(batch, prev_tokens)
        states = [V4State(self.cache.views(slot, torch.tensor(table, dtype=torch.int64, device=self.device)), p0)
                  for slot, table, p0 in zip(batch.state_slots, batch.block_tables, batch.start_pos)]
        input_ids = torch.tensor(batch.input_ids, dtype=torch.int64, device=self.device)
        fill_pending(input_ids, batch.pending_pos, batch.pending_rows, prev_tokens)
        hidden = self.model(input_ids, states, batch.num_new)
        if not batch.all_logits:
            last = list(itertools.accumulate(batch.num_new))
            hidden = hidden[torch.tensor(last, device=self.device) - 1]
        return self.model.compute_logits(hidden)

    def _decode(self, batch: V4StepBatch, prev_tokens: torch.Tensor | None) -> torch.Tensor:
        """Eagerly, with shapes fitted to this batch."""
        B = len(batch.num_new)
        width = max(len(t) for t in batch.block_tables)
        tables = [p for t in batch.block_tables for p in t + [self.cache.scratch_page] * (width - len(t))]
        packed = torch.tensor(batch.input_ids + batch.start_pos + batch.state_slots + tables,
                              dtype=torch.int64).to(self.device, non_blocking=True)
        input_ids = packed[:B]
        fill_pending(input_ids, batch.pending_pos, batch.pending_rows, prev_tokens)
        last = max(batch.start_pos)
        decode = self.cache.decode_batch(input_ids, packed[B:2 * B], packed[2 * B:3 * B],
                                         packed[3 * B:].view(B, width), {m: last // m + 1 for m in self.ratios})
        return self.model.compute_logits(self.model.decode(decode))

    def run(self, seqs: list[Sequence], num_new: list[int], all_logits: bool = False,
            prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        return self.execute(self.build(seqs, num_new, all_logits), prev_tokens)


def load_v4(path, config: EngineConfig, simulate_qat: bool | None) -> tuple[Transformer, ModelArgsV4]:
    """The V4 model of a checkpoint folder on config's device, with the QAT simulation on unless told otherwise."""
    if config.tensor_parallel_size > 1:
        raise ValueError("DeepSeek-V4 runs on one process for now; use tensor_parallel_size 1 (--tp 1)")
    return load_model_v4(path, config.torch_dtype, config.torch_device, True if simulate_qat is None else simulate_qat,
                         config.progress)
