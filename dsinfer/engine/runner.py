"""ModelRunner: turns scheduled sequences into one flat batch, runs the model, returns logits."""

from __future__ import annotations

import torch

from ..models import AttentionMetadata
from .kv_cache import KVCache
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: KVCache, device: torch.device):
        self.model, self.cache, self.device = model, cache, device
        self.page_size = cache.page_size

    def prepare(self, seqs: list[Sequence], num_new: list[int]) -> tuple[torch.Tensor, AttentionMetadata]:
        """The next num_new[i] uncached tokens of each sequence, as input ids and attention metadata."""
        page_size = self.page_size
        ids, positions, slots, starts, context_lens = [], [], [], [0], []
        for seq, n in zip(seqs, num_new):
            begin, end = seq.num_cached_tokens, seq.num_cached_tokens + n
            ids += seq.token_ids[begin:end]
            positions += range(begin, end)
            slots += [seq.block_table[p // page_size] * page_size + p % page_size for p in range(begin, end)]
            starts.append(starts[-1] + n)
            context_lens.append(end)
        width = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        to = dict(device=self.device)
        attn = AttentionMetadata(
            positions=torch.tensor(positions, dtype=torch.int64, **to),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, **to),
            block_tables=torch.tensor(tables, dtype=torch.int32, **to),
            query_start_loc=starts, context_lens=context_lens,
            cu_seqlens_q=torch.tensor(starts, dtype=torch.int32, **to),
            seq_lens=torch.tensor(context_lens, dtype=torch.int32, **to),
            max_query_len=max(num_new), max_seq_len=max(context_lens))
        return torch.tensor(ids, dtype=torch.int64, **to), attn

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], num_new: list[int], all_logits: bool = False) -> torch.Tensor:
        """Logits (float32) of each sequence's last new token, (B, V); or of every new token, (T, V)."""
        input_ids, attn = self.prepare(seqs, num_new)
        hidden = self.model(input_ids, self.cache.layers, attn)
        if not all_logits:
            hidden = hidden[torch.tensor(attn.query_start_loc[1:], device=self.device) - 1]
        return self.model.compute_logits(hidden)
