"""V4ModelRunner: the DeepSeek-V4 twin of ModelRunner. Turns scheduled sequences into one flat batch, runs the
V4 model over each sequence's state slot and pages (v4_cache.py), returns logits."""

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
        prev_tokens: the previous step's sampled tokens on the device, for the batch's PENDING input ids."""
        states = [V4State(self.cache.views(slot, torch.tensor(table, dtype=torch.int64, device=self.device)), p0)
                  for slot, table, p0 in zip(batch.state_slots, batch.block_tables, batch.start_pos)]
        input_ids = torch.tensor(batch.input_ids, dtype=torch.int64, device=self.device)
        fill_pending(input_ids, batch.pending_pos, batch.pending_rows, prev_tokens)
        hidden = self.model(input_ids, states, batch.num_new)
        if not batch.all_logits:
            last = list(itertools.accumulate(batch.num_new))
            hidden = hidden[torch.tensor(last, device=self.device) - 1]
        return self.model.compute_logits(hidden)

    def run(self, seqs: list[Sequence], num_new: list[int], all_logits: bool = False,
            prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        return self.execute(self.build(seqs, num_new, all_logits), prev_tokens)


def load_v4(path, config: EngineConfig, simulate_qat: bool | None) -> tuple[Transformer, ModelArgsV4]:
    """The V4 model of a checkpoint folder on config's device, with the QAT simulation on unless told otherwise."""
    if config.tensor_parallel_size > 1:
        raise ValueError("DeepSeek-V4 runs on one process for now; use tensor_parallel_size 1 (--tp 1)")
    return load_model_v4(path, config.torch_dtype, config.torch_device, True if simulate_qat is None else simulate_qat,
                         config.progress)
