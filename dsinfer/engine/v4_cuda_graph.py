"""DeepSeek-V4 decode steps as CUDA graphs, one per (batch-size bucket, context bucket).

Design. The V4 decode path (models/deepseek_v4.Transformer.decode) reads every sequence's state through its slot
and block table, so a step's inputs are four static buffers: token ids, positions, state slots and block tables.
Rows that pad a batch up to its bucket use the cache's scratch slot and page at position 0. The one shape that
depends on the context is the number of compressed entries a row may address (E = context / ratio): the CSA
indexer scores and ranks E entries per row, so a graph sized for the longest context would pay for it at every
step. Graphs are therefore also bucketed by context: the smallest bucket is the longest context at which no CSA
row has more than index_topk entries (nothing is scored then), each next one 8 times longer, up to the engine's
max_model_len or GRAPH_MAX_CONTEXT; longer contexts decode eagerly (same path, no graph).
"""

from __future__ import annotations

import torch

from ..models.args_v4 import CSA
from .cuda_graph import batch_buckets, capture_graphs, release_graphs
from .sequence import fill_pending

GRAPH_MAX_CONTEXT = 131072      # tokens; past this, decode steps run eagerly


def context_buckets(max_seq_len: int, first: int) -> list[int]:
    """first, 8 * first, 64 * first, ... capped at max_seq_len and GRAPH_MAX_CONTEXT (which are always last)."""
    cap = min(max_seq_len, GRAPH_MAX_CONTEXT)
    sizes, c = [], first
    while c < cap:
        sizes.append(c)
        c *= 8
    return sizes + [cap]


class V4CudaGraphRunner:
    def __init__(self, runner, max_batch: int, max_seq_len: int):
        self.runner, self.device = runner, runner.device
        cache, args = runner.cache, runner.model.args
        self.page_size, self.scratch_slot, self.scratch_page = cache.page_size, cache.scratch_slot, cache.scratch_page
        csa = [m for kind, m in zip(args.attn_types, args.compress_ratios) if kind == CSA]
        first = max(csa) * args.index_topk if csa else GRAPH_MAX_CONTEXT
        self.contexts = context_buckets(max_seq_len, first)
        self.buckets = batch_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        n, width = self.max_batch, -(-self.contexts[-1] // self.page_size)
        to = dict(dtype=torch.int64, device=self.device)
        self.input_ids = torch.zeros(n, **to)
        self.positions = torch.zeros(n, **to)
        self.slots = torch.full((n,), self.scratch_slot, **to)
        self.block_tables = torch.full((n, width), self.scratch_page, **to)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, int], torch.Tensor] = {}

    def _forward(self, key: tuple[int, int]) -> torch.Tensor:
        bs, ctx = key
        r = self.runner
        batch = r.cache.decode_batch(self.input_ids[:bs], self.positions[:bs], self.slots[:bs],
                                     self.block_tables[:bs, :-(-ctx // self.page_size)],
                                     {m: -(-ctx // m) for m in r.ratios})
        return r.model.compute_logits(r.model.decode(batch))

    def capture(self) -> None:
        keys = [(bs, ctx) for ctx in reversed(self.contexts) for bs in reversed(self.buckets)]
        self.graphs, self.logits, _ = capture_graphs(keys, self._forward, self.device)

    def release(self) -> None:
        release_graphs(self.graphs, self.device)
        self.logits.clear()

    def can_run(self, num_seqs: int, context: int) -> bool:
        return bool(self.graphs) and num_seqs <= self.max_batch and context <= self.contexts[-1]

    def run(self, batch, prev_tokens: torch.Tensor | None) -> torch.Tensor:
        """One decode step (a V4StepBatch of one new token per sequence) -> logits (B, V) float32 (a view of a
        static buffer, valid until the next replay)."""
        B = len(batch.input_ids)
        bs = next(b for b in self.buckets if b >= B)
        ctx = next(c for c in self.contexts if c >= max(batch.start_pos) + 1)
        pad, width = bs - B, -(-ctx // self.page_size)
        tables = [p for t in batch.block_tables for p in t[:width] + [self.scratch_page] * (width - len(t))]
        packed = torch.tensor(batch.input_ids + [0] * pad + batch.start_pos + [0] * pad + batch.state_slots
                              + [self.scratch_slot] * pad + tables + [self.scratch_page] * (pad * width),
                              dtype=torch.int64).to(self.device, non_blocking=True)
        self.input_ids[:bs].copy_(packed[:bs])
        self.positions[:bs].copy_(packed[bs:2 * bs])
        self.slots[:bs].copy_(packed[2 * bs:3 * bs])
        self.block_tables[:bs, :width].copy_(packed[3 * bs:].view(bs, width))
        fill_pending(self.input_ids, batch.pending_pos, batch.pending_rows, prev_tokens)
        self.graphs[bs, ctx].replay()
        return self.logits[bs, ctx][:B]
