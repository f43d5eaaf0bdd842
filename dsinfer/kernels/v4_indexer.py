"""The DeepSeek-V4 lightning indexer's scoring and top-k (spec section 2.8), in Triton, and its PyTorch twins.

Given one sequence's indexer queries q (S, H, d) (rotated, Hadamard-transformed, maybe FP4-rounded), the keys of
its n finished compressed entries (n, d), the head weights w (S, H) (weights_proj output already scaled) and the
query positions, the index score of entry t for query s is
    I[s, t] = sum_h w[s, h] * relu(q[s, h] . keys[t])     if t < (positions[s] + 1) // ratio, else -inf,
and each query keeps the top min(topk, n) entries by score, -1 where fewer are visible. This is the tail of
models/v4_indexer.Indexer.forward, the oracle the twins copy line for line.

The score matrix is the heavy part: S * n * H * d multiply-adds over reads of S * H * d + n * d, the largest of
the indexer. The kernel runs one program per (query, block of keys) and skips key blocks that lie wholly past the
query's visible prefix (about half of them in a prefill). Selection then runs torch.topk over the kernel's (S, n)
output; a Triton top-k over rows of up to hundreds of thousands of entries is future work.
"""

from __future__ import annotations

import torch

from .triton_common import check_device, check_tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def indexer_scores_torch(q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor, positions: torch.Tensor,
                         ratio: int) -> torch.Tensor:
    """q: (S, H, d); keys: (n, d); w: (S, H) float32; positions: (S,) int64. Returns (S, n) float32 index
    scores, -inf where entry t is not yet visible to the query (t >= (position + 1) // ratio)."""
    n = keys.shape[0]
    scores = torch.einsum("shd,td->sht", q.float(), keys.float()).relu()
    index = (scores * w.unsqueeze(-1)).sum(dim=1)                                       # (S, n)
    visible = torch.arange(n, device=q.device)[None] < ((positions + 1) // ratio)[:, None]
    return index.masked_fill(~visible, float("-inf"))


def indexer_scores_rows_torch(q: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, w: torch.Tensor,
                              positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """A batch of sequences, one query each: q (B, H, d); keys (N, d) holding every sequence's entries; rows (B, E)
    int64, rows[b, t] = where entry t of sequence b lies in keys (anything where it is not visible); w (B, H) float32;
    positions (B,) int64. Returns (B, E) float32 index scores, -inf where t >= (position + 1) // ratio."""
    E = rows.shape[1]
    visible = torch.arange(E, device=q.device)[None] < ((positions + 1) // ratio)[:, None]
    k = keys[torch.where(visible, rows, 0)]                                             # (B, E, d)
    index = (torch.einsum("bhd,btd->bht", q.float(), k.float()).relu() * w.unsqueeze(-1)).sum(dim=1)
    return index.masked_fill(~visible, float("-inf"))


def indexer_topk_torch(q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor, positions: torch.Tensor, ratio: int,
                       topk: int) -> torch.Tensor:
    """Arguments as indexer_scores_torch. Returns (S, min(topk, n)) int64: the entries each query keeps, highest
    score first, -1 where fewer than that are visible (ties broken as torch.topk breaks them)."""
    n = keys.shape[0]
    index = indexer_scores_torch(q, keys, w, positions, ratio)
    visible = torch.arange(n, device=q.device)[None] < ((positions + 1) // ratio)[:, None]
    top = index.topk(min(topk, n), dim=-1).indices                                      # (S, k)
    return top.masked_fill(~visible.gather(1, top), -1)


def _check(q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor, positions: torch.Tensor, ratio: int) -> None:
    check_tensor("q", q, DTYPES, 3)
    check_tensor("keys", keys, (q.dtype,), 2)
    check_tensor("w", w, (torch.float32,), 2)
    check_tensor("positions", positions, (torch.int64,), 1)
    check_device(q=q, keys=keys, w=w, positions=positions)
    S, H, d = q.shape
    if keys.shape[1] != d or w.shape != (S, H) or positions.shape[0] != S:
        raise ValueError(f"shapes do not agree: q {tuple(q.shape)} (S, H, d), keys {tuple(keys.shape)} (n, d), "
                         f"w {tuple(w.shape)} (S, H), positions {tuple(positions.shape)} (S,)")
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"ratio must be a positive int (tokens per compressed entry), got {ratio!r}")


def indexer_scores(q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor, positions: torch.Tensor,
                   ratio: int) -> torch.Tensor:
    """The Triton kernel; arguments and result as indexer_scores_torch (keys in q's dtype, all contiguous)."""
    _check(q, keys, w, positions, ratio)
    S, n = q.shape[0], keys.shape[0]
    out = torch.empty(S, n, dtype=torch.float32, device=q.device)
    if S and n:
        from .v4_indexer_triton import launch
        launch(q, keys, w, positions, ratio, out)
    return out


def indexer_scores_rows(q: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, w: torch.Tensor,
                        positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """The Triton kernel; arguments and result as indexer_scores_rows_torch (all contiguous). Work and reads grow
    with each row's visible entries, not with E."""
    _check(q, keys, w, positions, ratio)
    check_tensor("rows", rows, (torch.int64,), 2)
    check_device(q=q, rows=rows)
    if rows.shape[0] != q.shape[0]:
        raise ValueError(f"rows {tuple(rows.shape)} needs one row (B, E) per query of q {tuple(q.shape)}")
    out = torch.empty(rows.shape, dtype=torch.float32, device=q.device)
    if out.numel():
        from .v4_indexer_triton import launch
        launch(q, keys, w, positions, ratio, out, rows)
    return out


def indexer_topk(q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor, positions: torch.Tensor, ratio: int,
                 topk: int) -> torch.Tensor:
    """indexer_scores, then torch.topk over its rows; arguments and result as indexer_topk_torch."""
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive int (entries each query keeps), got {topk!r}")
    index = indexer_scores(q, keys, w, positions, ratio)                               # (S, n), checks the rest
    top = index.topk(min(topk, index.shape[1]), dim=-1).indices                        # (S, k)
    limit = (positions + 1) // ratio                                                   # visible: t < limit
    return top.masked_fill(top >= limit[:, None], -1)
