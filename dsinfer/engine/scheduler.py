"""Scheduler: which sequences run in the next step, and how many tokens of each.

Design: one token budget per step (max_num_batched_tokens). Running sequences are served first (a decode
costs one token, an unfinished prompt continues in a chunk), then waiting sequences are admitted in order
while pages and the sequence cap allow. A sequence is admitted with every page it can ever need
(prompt + max_tokens), so a running sequence never runs out of cache and nothing needs preempting.
"""

from __future__ import annotations

from collections import deque

from ..config import EngineConfig
from .kv_cache import KVCache
from .sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, config: EngineConfig, cache: KVCache):
        self.config, self.cache = config, cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        need = self.cache.pages_for(seq.max_cache_tokens)
        if need > self.cache.num_pages:
            raise ValueError(f"prompt + max_tokens need {seq.max_cache_tokens} tokens of KV cache but the cache holds "
                             f"{self.cache.num_pages * self.cache.page_size}; lower max_tokens or give the cache "
                             "more memory")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], list[int]]:
        budget = self.config.max_num_batched_tokens
        seqs, num_new = [], []

        def take(seq: Sequence) -> None:
            nonlocal budget
            n = min(seq.num_tokens - seq.num_cached_tokens, budget)
            if n > 0:
                seqs.append(seq)
                num_new.append(n)
                budget -= n

        decoding = [s for s in self.running if s.num_tokens - s.num_cached_tokens == 1]
        prefilling = [s for s in self.running if s.num_tokens - s.num_cached_tokens > 1]
        for seq in decoding + prefilling:
            take(seq)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            need = self.cache.pages_for(seq.max_cache_tokens)
            if need > self.cache.num_free_pages:
                break
            self.waiting.popleft()
            seq.block_table = self.cache.allocate(need)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            take(seq)
        return seqs, num_new

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark a sequence finished and free its pages at once."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.cache.free(seq.block_table)
        seq.block_table = []
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
