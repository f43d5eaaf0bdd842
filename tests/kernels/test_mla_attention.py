"""MLA attention twins over a paged latent cache.

Oracle: plain dense causal attention written here, one query token at a time, over each sequence's *unpaged*
latents. The cache is filled through a random page permutation and every row no sequence owns holds NaN, so a
wrong page lookup or a read past a context shows. A last test checks the weight-absorption algebra: the
absorbed form fed W_UK^T q_nope, times W_UV, equals the naive form fed wkv_b.
"""

import math

import pytest
import torch

from dsinfer.kernels.mla_attention import mla_attention_torch, mla_naive_attention_torch

H, R, P, DN, DV = 4, 32, 8, 16, 12        # heads, latent rank, rope dim, nope head dim, value head dim
SCALE = 1 / math.sqrt(DN + P)

# Each case: page_size -> [(context_len, num_new_tokens), ...], one pair per sequence in the batch.
CASES = {
    "one-token": lambda ps: [(1, 1)],
    "one-full-page-prefill": lambda ps: [(ps, ps)],
    "decode-at-page-boundary": lambda ps: [(ps, 1)],
    "decode-first-token-of-new-page": lambda ps: [(ps + 1, 1)],
    "several-pages-prefill": lambda ps: [(3 * ps + 2, 3 * ps + 2)],
    "chunk-after-prefix-ending-mid-page": lambda ps: [(ps + ps // 2 + 4, 3)],
    "mixed-batch": lambda ps: [(1, 1), (2 * ps + 3, 1), (3 * ps + 5, 5), (ps // 2 + 2, ps // 2 + 2), (17, 0)],
    "zero-new-tokens-first": lambda ps: [(ps + 3, 0), (5, 2), (9, 0), (2 * ps, 1)],
}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def build_batch(lengths, page_size, dtype, seed):
    """Random unpaged latents per sequence, scattered into a paged cache through a random page permutation.

    Returns (latents, kv_cache, block_tables): latents[b] is (context_len, R + P) in `dtype`."""
    g = gen(seed)
    pages_per_seq = [-(-length // page_size) for length, _ in lengths]
    num_pages = sum(pages_per_seq) + 3                                   # a few pages nobody owns
    perm = torch.randperm(num_pages, generator=g).tolist()
    kv_cache = torch.full((num_pages, page_size, R + P), float("nan"), dtype=dtype)
    max_pages = max(pages_per_seq)
    block_tables = torch.full((len(lengths), max_pages + 1), num_pages - 1, dtype=torch.int32)  # padding: junk
    latents = []
    for b, (length, _) in enumerate(lengths):
        lat = torch.randn(length, R + P, generator=g).to(dtype)
        own, perm = perm[:pages_per_seq[b]], perm[pages_per_seq[b]:]
        block_tables[b, :len(own)] = torch.tensor(own, dtype=torch.int32)
        for t in range(length):
            kv_cache[own[t // page_size], t % page_size] = lat[t]
        latents.append(lat)
    return latents, kv_cache, block_tables


def reference_absorbed(q_latent, q_pe, latents, lengths):
    """Dense causal attention, query by query: scores = q_latent . c + q_pe . k_pe over tokens 0..pos."""
    out, row = [], 0
    for lat, (length, n_new) in zip(latents, lengths):
        c, k_pe = lat[:, :R].double(), lat[:, R:].double()
        for i in range(n_new):
            pos = length - n_new + i
            scores = (q_latent[row].double() @ c[:pos + 1].T + q_pe[row].double() @ k_pe[:pos + 1].T) * SCALE
            out.append(scores.softmax(-1) @ c[:pos + 1])                 # (H, R)
            row += 1
    return torch.stack(out) if out else torch.empty(0, H, R, dtype=torch.double)


def reference_naive(q_nope, q_pe, latents, lengths, wkv_b):
    """Dense causal attention with per-head keys [W_UK c, k_pe] and values W_UV c."""
    w_uk, w_uv = wkv_b[:, :DN].double(), wkv_b[:, DN:].double()          # (H, DN, R), (H, DV, R)
    out, row = [], 0
    for lat, (length, n_new) in zip(latents, lengths):
        c, k_pe = lat[:, :R].double(), lat[:, R:].double()
        for i in range(n_new):
            pos = length - n_new + i
            heads = []
            for h in range(H):
                k = torch.cat([c[:pos + 1] @ w_uk[h].T, k_pe[:pos + 1]], dim=-1)   # (pos + 1, DN + P)
                v = c[:pos + 1] @ w_uv[h].T                                        # (pos + 1, DV)
                q = torch.cat([q_nope[row, h], q_pe[row, h]]).double()
                heads.append((k @ q * SCALE).softmax(-1) @ v)
            out.append(torch.stack(heads))                                         # (H, DV)
            row += 1
    return torch.stack(out) if out else torch.empty(0, H, DV, dtype=torch.double)


def query_layout(lengths):
    starts = [0]
    for _, n_new in lengths:
        starts.append(starts[-1] + n_new)
    return starts, [length for length, _ in lengths]


TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_twins_match_dense_reference(case, page_size, dtype):
    lengths = CASES[case](page_size)
    latents, kv_cache, block_tables = build_batch(lengths, page_size, dtype, seed=page_size)
    starts, context_lens = query_layout(lengths)
    t = starts[-1]
    g = gen(1)
    q_latent = torch.randn(t, H, R, generator=g).to(dtype)
    q_nope = torch.randn(t, H, DN, generator=g).to(dtype)
    q_pe = torch.randn(t, H, P, generator=g).to(dtype)
    wkv_b = (torch.randn(H, DN + DV, R, generator=g) / math.sqrt(R)).to(dtype)

    out = mla_attention_torch(q_latent, q_pe, kv_cache, block_tables, starts, context_lens, SCALE)
    assert out.shape == (t, H, R) and out.dtype == dtype
    torch.testing.assert_close(out.double(), reference_absorbed(q_latent, q_pe, latents, lengths), **TOL[dtype])

    out = mla_naive_attention_torch(q_nope, q_pe, kv_cache, block_tables, starts, context_lens, SCALE, wkv_b)
    assert out.shape == (t, H, DV) and out.dtype == dtype
    torch.testing.assert_close(out.double(), reference_naive(q_nope, q_pe, latents, lengths, wkv_b), **TOL[dtype])


def test_causality_future_tokens_do_not_matter():
    """Changing the cache after a query's position leaves its output alone; changing before it does not."""
    lengths = [(9, 9)]
    latents, kv_cache, block_tables = build_batch(lengths, 4, torch.float32, seed=5)
    q_latent, q_pe = torch.randn(9, H, R, generator=gen(2)), torch.randn(9, H, P, generator=gen(3))
    before = mla_attention_torch(q_latent, q_pe, kv_cache, block_tables, [0, 9], [9], SCALE)
    page, slot = block_tables[0, 1].item(), 2                           # token 6
    kv_cache[page, slot] += 3.0
    after = mla_attention_torch(q_latent, q_pe, kv_cache, block_tables, [0, 9], [9], SCALE)
    assert torch.equal(before[:6], after[:6])
    assert not torch.allclose(before[6:], after[6:])


@pytest.mark.parametrize("case", ["one-token", "several-pages-prefill", "mixed-batch", "zero-new-tokens-first"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_absorbed_equals_naive_through_weight_absorption(case, page_size):
    """naive(q_nope, wkv_b) == absorbed(q_latent = W_UK^T q_nope) @ W_UV^T, per head."""
    lengths = CASES[case](page_size)
    _, kv_cache, block_tables = build_batch(lengths, page_size, torch.float32, seed=7)
    starts, context_lens = query_layout(lengths)
    g = gen(4)
    q_nope = torch.randn(starts[-1], H, DN, generator=g)
    q_pe = torch.randn(starts[-1], H, P, generator=g)
    wkv_b = torch.randn(H, DN + DV, R, generator=g) / math.sqrt(R)
    w_uk, w_uv = wkv_b[:, :DN], wkv_b[:, DN:]                           # (H, DN, R), (H, DV, R)

    # q_nope . (W_UK c) = (W_UK^T q_nope) . c, so the absorbed query is W_UK^T q_nope, per head
    q_latent = torch.einsum("thd,hdr->thr", q_nope, w_uk)               # (T, H, R)
    latent_out = mla_attention_torch(q_latent, q_pe, kv_cache, block_tables, starts, context_lens, SCALE)
    absorbed = torch.einsum("thr,hvr->thv", latent_out, w_uv)            # sum_l p_l W_UV c_l = W_UV (sum_l p_l c_l)

    naive = mla_naive_attention_torch(q_nope, q_pe, kv_cache, block_tables, starts, context_lens, SCALE, wkv_b)
    torch.testing.assert_close(absorbed, naive, atol=1e-5, rtol=1e-5)
