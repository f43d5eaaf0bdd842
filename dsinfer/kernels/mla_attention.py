"""Multi-head latent attention over a paged latent cache: the PyTorch twins (one loop step per sequence).

Cache layout, per layer: `kv_cache` (num_pages, page_size, R + P), each row the normalised latent c (R values)
followed by the rotated shared key k_pe (P values). Sequence b owns pages `block_tables[b]`; its tokens
0..context_lens[b]-1 sit at rows page*page_size + offset. The queries of sequence b are rows
query_start_loc[b]..query_start_loc[b+1]-1 and are the *last* tokens of its context (causal).
"""

from __future__ import annotations

import torch


def gather_context(kv_cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Rows 0..length-1 of one sequence: (length, R + P) in the cache dtype."""
    page_size = kv_cache.shape[1]
    n_pages = -(-length // page_size)
    return kv_cache[block_table[:n_pages].long()].reshape(-1, kv_cache.shape[-1])[:length]


def _causal_softmax(scores: torch.Tensor, context_len: int) -> torch.Tensor:
    """scores: (n, H, L) float32 for the last n tokens of a length-L context -> probabilities."""
    n, _, length = scores.shape
    q_pos = torch.arange(length - n, length, device=scores.device)
    mask = torch.arange(length, device=scores.device)[None, :] > q_pos[:, None]    # (n, L)
    return scores.masked_fill(mask[:, None, :], float("-inf")).softmax(dim=-1)


def mla_attention_torch(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                        block_tables: torch.Tensor, query_start_loc: list[int], context_lens: list[int],
                        scale: float) -> torch.Tensor:
    """Absorbed MLA: softmax((q_latent . c + q_pe . k_pe) * scale) . c, accumulated in float32.

    q_latent: (T, H, R), q_pe: (T, H, P); kv_cache: (pages, page_size, R + P); block_tables: (B, max_pages) int32.
    Returns the attention-weighted latent (T, H, R) in q_latent's dtype.
    """
    rank = q_latent.shape[-1]
    out = torch.empty_like(q_latent)
    for b, length in enumerate(context_lens):
        t0, t1 = query_start_loc[b], query_start_loc[b + 1]
        if t1 == t0:
            continue
        kv = gather_context(kv_cache, block_tables[b], length).float()               # (L, R + P)
        c, k_pe = kv[:, :rank], kv[:, rank:]
        scores = (q_latent[t0:t1].float() @ c.T + q_pe[t0:t1].float() @ k_pe.T) * scale   # (n, H, L)
        out[t0:t1] = (_causal_softmax(scores, length) @ c).to(out.dtype)
    return out


def mla_naive_attention_torch(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                              block_tables: torch.Tensor, query_start_loc: list[int], context_lens: list[int],
                              scale: float, wkv_b: torch.Tensor) -> torch.Tensor:
    """Naive MLA: expand every cached latent into per-head keys and values, then plain attention.

    q_nope: (T, H, Dn), q_pe: (T, H, P); wkv_b: (H, Dn + Dv, R) float. Returns (T, H, Dv) in q_nope's dtype.
    """
    n_heads, dn = q_nope.shape[1], q_nope.shape[2]
    rank = wkv_b.shape[-1]
    dv = wkv_b.shape[1] - dn
    out = q_nope.new_empty(q_nope.shape[0], n_heads, dv)
    w = wkv_b.float()
    for b, length in enumerate(context_lens):
        t0, t1 = query_start_loc[b], query_start_loc[b + 1]
        if t1 == t0:
            continue
        kv = gather_context(kv_cache, block_tables[b], length).float()
        c, k_pe = kv[:, :rank], kv[:, rank:]
        kv_h = torch.einsum("lr,hdr->hld", c, w)                                     # (H, L, Dn + Dv)
        k = torch.cat([kv_h[..., :dn], k_pe.expand(n_heads, -1, -1)], dim=-1)        # (H, L, Dn + P)
        v = kv_h[..., dn:]                                                           # (H, L, Dv)
        q = torch.cat([q_nope[t0:t1], q_pe[t0:t1]], dim=-1).float().transpose(0, 1)  # (H, n, Dn + P)
        scores = (q @ k.transpose(1, 2) * scale).transpose(0, 1)                     # (n, H, L)
        p = _causal_softmax(scores, length).transpose(0, 1)                          # (H, n, L)
        out[t0:t1] = (p @ v).transpose(0, 1).to(out.dtype)
    return out
