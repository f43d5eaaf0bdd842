"""The DeepSeek-V4 cache: fixed-size state per running sequence ("state slots") plus pages of compressed entries.

Design. A V4 layer keeps two kinds of state (models/v4_state.py). The fixed part does not grow with the
context: the sliding-window ring (window_size rows of head_dim; position p lives in row p % window_size) and each
compressor's buffers (the projections and gate scores of the unfinished window, and for overlapping CSA windows
the first half of the last finished one). The V4BlockManager gives every running sequence one slot of these
and takes it back on finish, abort or preemption. The growing part is the compressed entries (and, on CSA
layers, the indexer keys): entry w summarises tokens [w * ratio, (w + 1) * ratio) and is stored in the page that
holds token w * ratio, at row (w * ratio % page_size) // ratio, so the block manager's pages, counted in tokens
as for V3, own them; a page has ceil(page_size / ratio) rows per compressed layer. Nothing here is read before
it is written: every read is driven by the sequence's position (models/v4_state.py), so slots and pages are
handed out without clearing and a preempted sequence simply starts again at position 0.
Prefix caching is not offered: the window ring and the compressor buffers at a page boundary would have to be
kept too, and they are not a function of the page's tokens alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.args_v4 import CSA, SLIDING, ModelArgsV4
from ..models.v4_state import V4DecodeBatch


@dataclass(frozen=True)
class _Part:
    """One tensor of one layer: per slot or per page, and the shape of one slot's or page's share."""

    owner: str                 # "slot" or "page"
    shape: tuple[int, ...]
    float32: bool              # compressor buffers are float32; rows are in the model dtype


def _compressor_parts(ratio: int, d: int, overlap: bool, page_size: int) -> dict[str, _Part]:
    width = (2 if overlap else 1) * d
    parts = {"kv": _Part("slot", (ratio, width), True), "score": _Part("slot", (ratio, width), True),
             "entries": _Part("page", (-(-page_size // ratio), d), False)}
    if overlap:
        parts |= {"prev_kv": _Part("slot", (ratio, d), True), "prev_score": _Part("slot", (ratio, d), True)}
    return parts


def _layer_parts(args: ModelArgsV4, layer_id: int, page_size: int) -> dict[str, dict[str, _Part]]:
    kind, ratio = args.attn_types[layer_id], args.compress_ratios[layer_id]
    parts = {"window": {"ring": _Part("slot", (args.window_size, args.head_dim), False)}}
    if kind != SLIDING:
        parts["compressor"] = _compressor_parts(ratio, args.head_dim, kind == CSA, page_size)
    if kind == CSA:
        parts["indexer"] = _compressor_parts(ratio, args.index_head_dim, True, page_size)
    return parts


def v4_cache_bytes(args: ModelArgsV4, page_size: int, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes of one page, bytes of one state slot) over all layers."""
    size = {False: torch.empty((), dtype=dtype).element_size(), True: 4}
    total = {"page": 0, "slot": 0}
    for i in range(args.n_layers):
        for group in _layer_parts(args, i, page_size).values():
            for part in group.values():
                n = 1
                for s in part.shape:
                    n *= s
                total[part.owner] += n * size[part.float32]
    return total["page"], total["slot"]


class V4Cache:
    """Every layer's state of every sequence. Per layer, the attention's rows are one pool (N, head_dim): the state
    slots' window rings first, then (compressed layers) the pages of entries, so a decode step's sparse attention
    reads window rows and entries of all sequences through one index table. One slot and one page beyond those
    handed out are scratch: the padding rows of CUDA-graph decode steps write there."""

    def __init__(self, args: ModelArgsV4, num_pages: int, page_size: int, num_slots: int, dtype: torch.dtype,
                 device: torch.device):
        if num_pages < 1 or num_slots < 1:
            raise ValueError("the KV cache budget is too small for one page and one sequence's state; raise "
                             "cpu_cache_gib (CPU) or gpu_memory_utilization (GPU), or lower max_num_seqs")
        self.num_pages, self.page_size, self.num_slots = num_pages, page_size, num_slots
        self.scratch_slot, self.scratch_page = num_slots, num_pages
        self.window_size = args.window_size
        count = {"slot": num_slots + 1, "page": num_pages + 1}
        self.pools: list[torch.Tensor] = []
        self._owned: list[torch.Tensor] = []         # every tensor allocated (the rest are views of the pools)
        # layers[i][group][name]: group is "window", "compressor" or "indexer"
        self.layers: list[dict[str, dict[str, torch.Tensor]]] = []
        for i in range(args.n_layers):
            parts = _layer_parts(args, i, page_size)
            ring, entries = parts["window"]["ring"], parts.get("compressor", {}).get("entries")
            ring_rows = count["slot"] * ring.shape[0]
            entry_rows = count["page"] * entries.shape[0] if entries else 0
            pool = torch.zeros(ring_rows + entry_rows, args.head_dim, device=device, dtype=dtype)
            layer = {group: {name: torch.zeros(count[p.owner], *p.shape, device=device,
                                               dtype=torch.float32 if p.float32 else dtype)
                             for name, p in group_parts.items() if (group, name) != ("compressor", "entries")}
                     for group, group_parts in parts.items() if group != "window"}
            self._owned += [pool, *(t for group in layer.values() for t in group.values())]
            layer["window"] = {"ring": pool[:ring_rows].view(count["slot"], *ring.shape)}
            if entries:
                layer["compressor"]["entries"] = pool[ring_rows:].view(count["page"], *entries.shape)
            self.pools.append(pool)
            self.layers.append(layer)
        self.ratios = args.compress_ratios
        self.stores = [DecodeLayerStore(self, i) for i in range(args.n_layers)]   # for decode batches

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._owned)

    def views(self, slot: int, block_table: torch.Tensor) -> list[SlotLayerState]:
        """One sequence's state in every layer, as the model reads it; block_table: (pages,) int64 on the
        cache's device."""
        return [SlotLayerState(layer, slot, block_table, self.page_size, ratio)
                for layer, ratio in zip(self.layers, self.ratios)]

    def decode_batch(self, token_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                     block_tables: torch.Tensor, num_entries: dict[int, int]) -> V4DecodeBatch:
        """The model's view of a decode step: token ids, positions and state slots (B,) int64, block_tables
        (B, pages) int64 wide enough for the entries asked for, num_entries: entries to address per compression
        ratio m (more than any row's p // m). Where rows lie is worked out once here for every layer: window
        rows of positions p, p - 1, .., p - window_size + 1 (-1 before 0; every layer's ring starts its pool), and
        for each m where entry w of each row lies among a layer's entry rows (in the page of token w * m)."""
        W = self.window_size
        pos = positions[:, None] - torch.arange(W, device=positions.device)                  # (B, W)
        window_rows = torch.where(pos >= 0, slots[:, None] * W + pos % W, -1)
        entry_rows = {}
        for m, n in num_entries.items():
            token = torch.arange(n, device=block_tables.device) * m                            # (E,)
            entry_rows[m] = (block_tables[:, token // self.page_size] * -(-self.page_size // m)
                             + token % self.page_size // m)
        return V4DecodeBatch(token_ids, positions, slots, window_rows, entry_rows, self.stores)


class SlotCompressorState:
    """A compressor's state of one sequence: buffers in its slot, entries in its pages (the CompressorState
    interface of models/v4_state.py)."""

    def __init__(self, t: dict[str, torch.Tensor], slot: int, block_table: torch.Tensor, page_size: int,
                 ratio: int):
        self.t, self.slot, self.block_table, self.page_size, self.ratio = t, slot, block_table, page_size, ratio
        self.entries = t["entries"].view(-1, t["entries"].shape[-1])               # (pages * rows, d)
        self.rows_per_page = t["entries"].shape[1]

    def buffered(self, start_pos: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        r = start_pos % self.ratio
        return None if r == 0 else (self.t["kv"][self.slot, :r], self.t["score"][self.slot, :r])

    def previous(self, start_pos: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if start_pos < self.ratio:
            return None
        return self.t["prev_kv"][self.slot], self.t["prev_score"][self.slot]

    def keep(self, kv: torch.Tensor, score: torch.Tensor, prev: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        r = kv.shape[0]
        self.t["kv"][self.slot, :r] = kv
        self.t["score"][self.slot, :r] = score
        if prev is not None:
            self.t["prev_kv"][self.slot] = prev[0]
            self.t["prev_score"][self.slot] = prev[1]

    def _rows(self, first: int, n: int) -> torch.Tensor:
        """Rows of entries first .. first + n - 1 in the flat entries tensor: entry w lives in the page of
        token w * ratio."""
        token = torch.arange(first, first + n, device=self.block_table.device) * self.ratio
        return (self.block_table[token // self.page_size] * self.rows_per_page
                + token % self.page_size // self.ratio)

    def add_entries(self, entries: torch.Tensor, first: int) -> None:
        self.entries[self._rows(first, entries.shape[0])] = entries

    def read_entries(self, n: int) -> torch.Tensor:
        return self.entries[self._rows(0, n)]


class SlotLayerState:
    """One sequence's state in one layer (the LayerState interface of models/v4_state.py)."""

    def __init__(self, layer: dict[str, dict[str, torch.Tensor]], slot: int, block_table: torch.Tensor,
                 page_size: int, ratio: int):
        self.ring, self.slot = layer["window"]["ring"], slot
        self.compressor = SlotCompressorState(layer["compressor"], slot, block_table, page_size, ratio) \
            if "compressor" in layer else None
        self.indexer = SlotCompressorState(layer["indexer"], slot, block_table, page_size, ratio) \
            if "indexer" in layer else None

    def past_window(self, start_pos: int) -> torch.Tensor | None:
        W = self.ring.shape[1]
        first = max(0, start_pos - W + 1)
        if first == start_pos:
            return None
        return self.ring[self.slot, torch.arange(first, start_pos, device=self.ring.device) % W]

    def keep_window(self, rows: torch.Tensor, end_pos: int) -> None:
        W = self.ring.shape[1]
        self.ring[self.slot, torch.arange(end_pos - rows.shape[0], end_pos, device=self.ring.device) % W] = rows


class DecodeCompressorStore:
    """A compressor's (or indexer's) state of every sequence, for decode steps of one new token per sequence: the
    tensors kernels/v4_compress.py compress_decode updates."""

    def __init__(self, t: dict[str, torch.Tensor]):
        self.kv, self.score = t["kv"], t["score"]                                  # (slots, ratio, width)
        self.prev_kv, self.prev_score = t.get("prev_kv"), t.get("prev_score")      # (slots, ratio, d) or None
        self.entries = t["entries"].view(-1, t["entries"].shape[-1])               # (pages * rows, d)


class DecodeLayerStore:
    """One layer's state of every sequence, for decode steps (the decode-side interface the V4 model's
    Attention.decode reads): the pool of attention rows (the window ring at its start: rows batch.window_rows),
    the compressors'."""

    def __init__(self, cache: V4Cache, layer_id: int):
        layer, ratio = cache.layers[layer_id], cache.ratios[layer_id]
        self.pool, self.ring, self.ratio = cache.pools[layer_id], layer["window"]["ring"], ratio
        self.window_size = self.ring.shape[1]
        self.entries_base = self.ring.shape[0] * self.window_size                  # pool row of the first entry
        stores = {group: DecodeCompressorStore(layer[group]) for group in ("compressor", "indexer") if group in layer}
        self.compressor, self.indexer = stores.get("compressor"), stores.get("indexer")

    def write_window(self, kv: torch.Tensor, batch: V4DecodeBatch) -> None:
        """Each row's new key/value row (B, d) into its slot's ring, at p % window_size: the pool row of position p
        is batch.window_rows[:, 0]."""
        self.pool[batch.window_rows[:, 0]] = kv

    def entry_pool_rows(self, batch: V4DecodeBatch) -> torch.Tensor:
        """(B, E) int64 pool rows of each row's entries 0 .. E - 1 (E from the batch's entry_rows); the same for
        every layer of this ratio (every layer's rings take the same rows), so worked out once a step."""
        return batch.memo(("entry_pool_rows", self.ratio, self.entries_base),
                          lambda: batch.entry_rows[self.ratio] + self.entries_base)
