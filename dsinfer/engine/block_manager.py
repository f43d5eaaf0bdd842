"""BlockManager: who owns which page of the latent cache.

Pages have reference counts. A page whose count drops to zero goes to the end of the free list but keeps its
contents and, if it was full, its prefix hash: until the page is handed out again, a new request whose prompt
starts with the same tokens reuses it and skips that part of the prefill (prefix caching). The hash of page i
of a sequence covers its tokens and, through the hash of page i - 1, everything before them, so a hit means the
whole prefix matches (the tokens are compared too, so a hash collision cannot return wrong pages). Pages are
handed out from the front of the free list: the least recently freed cached page is evicted first.
"""

from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        self.num_pages, self.page_size = num_pages, page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_pages
        self.page_key: list[tuple | None] = [None] * num_pages        # (hash, tokens) of a full cached page
        self.cached: dict[int, int] = {}                              # prefix hash -> page
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_pages))
        self.num_query_tokens = 0                                     # tokens of admitted sequences ...
        self.num_hit_tokens = 0                                       # ... of which were found in the cache

    @property
    def num_free_pages(self) -> int:
        return len(self.free)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def _hash(self, seq: Sequence, i: int) -> tuple[int, tuple[int, ...]]:
        tokens = tuple(seq.token_ids[i * self.page_size:(i + 1) * self.page_size])
        prev = seq.page_hashes[i - 1] if i else 0
        return hash((prev, tokens)), tokens

    def match_prefix(self, seq: Sequence) -> None:
        """Give a new sequence the cached pages of its longest cached prefix; sets num_cached_tokens.
        The page holding the last token is never taken from the cache: its logits must be computed."""
        assert not seq.block_table and seq.num_cached_tokens == 0
        if not self.enable_prefix_caching:
            return
        for i in range((seq.num_tokens - 1) // self.page_size):
            h, tokens = self._hash(seq, i)
            page = self.cached.get(h)
            if page is None or self.page_key[page] != (h, tokens):
                break
            if self.ref_count[page] == 0:
                del self.free[page]
            self.ref_count[page] += 1
            seq.block_table.append(page)
            seq.page_hashes.append(h)
        seq.num_cached_tokens = len(seq.block_table) * self.page_size

    def ensure(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` pages for its first num_tokens tokens; False (and no change) if too few are free."""
        need = self.pages_for(num_tokens) - len(seq.block_table)
        if need > len(self.free):
            return False
        for _ in range(need):
            page, _ = self.free.popitem(last=False)
            if self.page_key[page] is not None:                       # evict its cached prefix
                del self.cached[self.page_key[page][0]]
                self.page_key[page] = None
            self.ref_count[page] = 1
            seq.block_table.append(page)
        return True

    def commit(self, seq: Sequence) -> None:
        """Register the pages `seq` has completely filled, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        for i in range(len(seq.page_hashes), seq.num_cached_tokens // self.page_size):
            h, tokens = self._hash(seq, i)
            seq.page_hashes.append(h)
            page = seq.block_table[i]
            if h not in self.cached and self.page_key[page] is None:
                self.cached[h] = page
                self.page_key[page] = (h, tokens)

    def release(self, seq: Sequence) -> None:
        """Drop `seq`'s claim on its pages; pages nobody holds become free (last page first, so it is evicted
        before the shared prefix pages)."""
        for page in reversed(seq.block_table):
            self.ref_count[page] -= 1
            if self.ref_count[page] == 0:
                self.free[page] = None
        seq.block_table = []
        seq.page_hashes = []


class V4BlockManager(BlockManager):
    """DeepSeek-V4: pages (of compressed entries) as above, without prefix caching, plus one state slot (sliding
    window, compressor buffers; see v4_cache.py) for every sequence that holds pages. A sequence gets its slot
    with its first pages and gives it back when it releases them (finish, abort, preemption)."""

    def __init__(self, num_pages: int, page_size: int, num_slots: int):
        super().__init__(num_pages, page_size, enable_prefix_caching=False)
        self.free_slots = list(range(num_slots - 1, -1, -1))

    def ensure(self, seq: Sequence, num_tokens: int) -> bool:
        if seq.state_slot is not None:
            return super().ensure(seq, num_tokens)
        if not self.free_slots or not super().ensure(seq, num_tokens):
            return False
        seq.state_slot = self.free_slots.pop()
        return True

    def release(self, seq: Sequence) -> None:
        super().release(seq)
        if seq.state_slot is not None:
            self.free_slots.append(seq.state_slot)
            seq.state_slot = None
