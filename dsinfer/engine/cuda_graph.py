"""Decode steps as CUDA graphs: one graph per batch-size bucket, replayed with the step's inputs copied into
static buffers. Prefills and mixed steps run eagerly.

Design. A decode step launches a few hundred small kernels; at small batches launching them costs more than
running them. A graph records the launches once per bucket (1, 2, 4, 8, then steps of 16) and replays them.
Everything a captured step reads lives in static device buffers: input ids, positions, cache slots, context
lengths and block tables (one row per sequence, as wide as the longest context the engine allows). A batch is
padded up to its bucket with rows that write a scratch cache page and attend to one key there. The attention
kernel sizes its split-KV grid from the engine's maximum context and splits each sequence by its own length, so
one launch shape serves every step. Nothing in the captured step waits for the host (the fused MoE routes on
the device), which `capture` checks by construction: a host sync inside capture is an error in CUDA.
"""

from __future__ import annotations

import torch

from ..models import AttentionMetadata
from .sequence import fill_pending


def batch_buckets(max_batch: int) -> list[int]:
    """Graph batch sizes: 1, 2, 4, 8, 16, 32, 48, ... up to and including max_batch."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


@torch.inference_mode()
def capture_graphs(keys: list, forward, device: torch.device) -> tuple[dict, dict, object]:
    """One graph per key, in the order given (largest first, so the later ones reuse the first one's memory pool),
    each recording `forward(key)` after one eager warm-up call (autotuning and lazy allocations happen there).
    Returns the graphs, their outputs (static tensors, refreshed by each replay) and the memory pool."""
    graphs, outputs, pool = {}, {}, None
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for key in keys:
            forward(key)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                outputs[key] = forward(key)
            pool = graph.pool()
            graphs[key] = graph
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    return graphs, outputs, pool


def release_graphs(graphs: dict, device: torch.device) -> None:
    torch.cuda.synchronize(device)
    for graph in graphs.values():
        graph.reset()
    graphs.clear()


class CudaGraphRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], scratch_page: int, page_size: int,
                 max_batch: int, max_seq_len: int, device: torch.device):
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.max_seq_len, self.page_size = max_seq_len, page_size
        self.buckets = batch_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        width = -(-max_seq_len // page_size)
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), scratch_page * page_size, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.full((n, width), scratch_page, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.scratch_slot, self.scratch_page = scratch_page * page_size, scratch_page
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def _metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            positions=self.positions[:bs], slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs],
            query_start_loc=list(range(bs + 1)), context_lens=[1] * bs, cu_seqlens_q=self.cu_seqlens_q[:bs + 1],
            seq_lens=self.seq_lens[:bs], max_query_len=1, max_seq_len=self.max_seq_len)

    def _forward(self, bs: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:bs], self.kv_caches, self._metadata(bs))
        return self.model.compute_logits(hidden)

    def capture(self) -> None:
        """Record one graph per bucket, largest first (so the smaller ones reuse its memory pool)."""
        self.graphs, self.logits, self.pool = capture_graphs(list(reversed(self.buckets)), self._forward, self.device)

    def release(self) -> None:
        """Free the graphs and their memory pool (before a tensor-parallel group is left: see ParallelState)."""
        release_graphs(self.graphs, self.device)
        self.logits.clear()
        self.pool = None

    def can_run(self, num_seqs: int, max_context: int) -> bool:
        return bool(self.graphs) and num_seqs <= self.max_batch and max_context <= self.max_seq_len

    def run(self, input_ids: list[int], positions: list[int], slot_mapping: list[int], context_lens: list[int],
            block_tables: list[list[int]], pending: tuple = ((), (), None)) -> torch.Tensor:
        """One decode step of B sequences (one new token each) -> logits (B, V) float32 (a view of a static
        buffer, valid until the next replay). pending: (positions, rows, previous tokens) for `fill_pending`."""
        B = len(input_ids)
        bs = next(b for b in self.buckets if b >= B)
        width = len(block_tables[0])
        pad = bs - B
        # one host-to-device copy for the whole step
        packed = torch.tensor(input_ids + [0] * pad + positions + [0] * pad + slot_mapping + [self.scratch_slot] * pad
                              + context_lens + [1] * pad + [p for row in block_tables for p in row]
                              + [self.scratch_page] * (pad * width), dtype=torch.int64).to(self.device,
                                                                                           non_blocking=True)
        self.input_ids[:bs].copy_(packed[:bs])
        self.positions[:bs].copy_(packed[bs:2 * bs])
        self.slot_mapping[:bs].copy_(packed[2 * bs:3 * bs])
        self.seq_lens[:bs].copy_(packed[3 * bs:4 * bs])
        self.block_tables[:bs, :width].copy_(packed[4 * bs:].view(bs, width))
        fill_pending(self.input_ids, *pending)
        self.graphs[bs].replay()
        return self.logits[bs][:B]
