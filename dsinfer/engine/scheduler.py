"""Scheduler: which sequences run in the next step, and how many of their tokens.

Design: one token budget per step (max_num_batched_tokens), spent first on running sequences (a decode costs
one token; a prompt that did not fit last time continues in a chunk), then on waiting sequences in arrival
order, each admitted with whatever its cached prefix saves and as much of the rest of its prompt as the budget
allows (chunked prefill). Pages are taken only for the tokens computed in this step. When they run out, the most
recently admitted sequence not yet scheduled in this step is preempted: its pages are released and it goes back
to the front of the queue with every token it has, to be recomputed later (its cached prefix often survives).
No sequence is admitted in a step that preempted one.
"""

from __future__ import annotations

from collections import deque

from ..config import EngineConfig
from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config, self.block_manager = config, block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        bm = self.block_manager
        if bm.pages_for(seq.max_cache_tokens) > bm.num_pages:
            raise ValueError(f"prompt + max_tokens need {seq.max_cache_tokens} tokens of KV cache but the cache holds "
                             f"{bm.num_pages * bm.page_size}; lower max_tokens or give the cache more memory")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], list[int]]:
        bm = self.block_manager
        budget = self.config.max_num_batched_tokens
        seqs: list[Sequence] = []
        num_new: list[int] = []
        preempted = False
        decoding = [s for s in self.running if s.num_tokens - s.num_cached_tokens == 1]
        for seq in decoding + [s for s in self.running if s not in decoding]:
            if seq.status != SequenceStatus.RUNNING or budget == 0 or seq.reached_length:
                continue                   # (reached_length: its last token is still on the device; it is done)
            n = min(seq.num_tokens - seq.num_cached_tokens, budget)
            while not bm.ensure(seq, seq.num_cached_tokens + n):
                victim = next(s for s in reversed(self.running) if s not in seqs)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status == SequenceStatus.RUNNING:
                seqs.append(seq)
                num_new.append(n)
                budget -= n
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            bm.match_prefix(seq)
            n = min(seq.num_tokens - seq.num_cached_tokens, budget)
            if not bm.ensure(seq, seq.num_cached_tokens + n):
                bm.release(seq)                        # waiting sequences hold no pages
                seq.num_cached_tokens = 0
                break
            bm.num_query_tokens += seq.num_tokens
            bm.num_hit_tokens += seq.num_cached_tokens
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            num_new.append(n)
            budget -= n
        return seqs, num_new

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.release(seq)
        seq.num_cached_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark a sequence finished and release its pages at once."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
