"""The Triton MLA attention and cache-write kernels against their PyTorch twins (through Triton's interpreter
on CPU), over paged caches with random page placement."""

import pytest
import torch

from dsinfer.kernels.cache_write import norm_rope_store, norm_rope_store_torch
from dsinfer.kernels.mla_attention import mla_attention_torch
from dsinfer.kernels.mla_triton import min_split_len, mla_attention
from dsinfer.kernels.norm_rope import rotate_pairs_torch

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"     # CPU: Triton's interpreter (set in conftest)


def i32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def paged_batch(context_lens, new_tokens, page_size, H, R, P, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    pages_per_seq = [-(-c // page_size) for c in context_lens]
    num_pages = sum(pages_per_seq) + 3
    kv = torch.full((num_pages, page_size, R + P), float("nan"), dtype=dtype)    # unowned rows are NaN
    perm = torch.randperm(num_pages, generator=g)
    tables = torch.zeros(len(context_lens), max(max(pages_per_seq), 1), dtype=torch.int32)
    k = 0
    for b, (ctx, n) in enumerate(zip(context_lens, pages_per_seq)):
        tables[b, :n] = perm[k:k + n]
        k += n
        rows = torch.randn(ctx, R + P, generator=g).to(dtype)
        flat = (tables[b, :n].long()[:, None] * page_size + torch.arange(page_size)).flatten()[:ctx]
        kv.view(-1, R + P)[flat] = rows
    starts = [0]
    for n in new_tokens:
        starts.append(starts[-1] + n)
    T = starts[-1]
    q_latent = torch.randn(T, H, R, generator=g).to(dtype)
    q_pe = torch.randn(T, H, P, generator=g).to(dtype)
    return q_latent.to(DEVICE), q_pe.to(DEVICE), kv.to(DEVICE), tables.to(DEVICE), starts


CASES = {
    "one token": ([1], [1]),
    "full page decode": ([16], [1]),
    "many pages decode": ([70], [1]),
    "prefill from zero": ([23], [23]),
    "chunk after a prefix ending mid-page": ([37], [9]),
    "mixed batch": ([5, 40, 16, 1, 33], [1, 7, 16, 1, 1]),
    "a sequence with no new tokens": ([12, 9], [0, 3]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_attention_equals_twin(case, page_size, splits):
    context_lens, new_tokens = CASES[case]
    H, R, P = 4, 32, 16
    ql, qp, kv, tables, starts = paged_batch(context_lens, new_tokens, page_size, H, R, P, torch.float32)
    ref = mla_attention_torch(ql, qp, kv, tables, starts, context_lens, 0.25)
    out = mla_attention(ql, qp, kv, tables, i32(starts),
                        i32(context_lens), 0.25, max(new_tokens), max(context_lens),
                        num_splits=splits)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_attention_with_an_overstated_max_seq_len():
    """CUDA graphs launch with max_seq_len = the model's limit: splits follow each sequence's real length."""
    context_lens, new_tokens = [3, 2100, 1030], [1, 1, 1]
    ql, qp, kv, tables, starts = paged_batch(context_lens, new_tokens, 64, 2, 32, 16, torch.float32)
    ref = mla_attention_torch(ql, qp, kv, tables, starts, context_lens, 0.25)
    out = mla_attention(ql, qp, kv, tables, i32(starts), i32(context_lens), 0.25, 1, 65536)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split_len", [None, 16, 7])
def test_decode_splits_of_short_contexts_merge_to_the_twin(split_len):
    """The grid sized for a long context (up to 64 splits), each sequence split by its own length into ranges of
    split_len keys or more (None: the default for its heads): context 1, exactly one full page, many pages, a
    context ending mid-page, one just past a split boundary; the merge reads only the ranges a sequence used."""
    context_lens = [1, 16, 16 * 9, 16 * 5 + 7, 33, 600, 65]
    new_tokens = [1] * len(context_lens)
    ql, qp, kv, tables, starts = paged_batch(context_lens, new_tokens, 16, 3, 32, 16, torch.float32, seed=4)
    ref = mla_attention_torch(ql, qp, kv, tables, starts, context_lens, 0.3)
    out = mla_attention(ql, qp, kv, tables, i32(starts), i32(context_lens), 0.3, 1, 1 << 20,
                        config=None if split_len is None else dict(min_split_len=split_len))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_min_split_len_follows_the_heads():
    assert [min_split_len(h) for h in (1, 16, 64, 100, 128)] == [64, 64, 64, 128, 128]


def _angles(T, P, seed):
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(T, P // 2, generator=g) * 6
    return torch.stack([angles.cos(), angles.sin()], dim=-1)                  # (T, P/2, 2)


@pytest.mark.parametrize("case", ["one token", "many pages decode", "chunk after a prefix ending mid-page",
                                  "mixed batch"])
@pytest.mark.parametrize("splits", [None, 3])
def test_attention_rotates_q_pe_in_the_kernel(case, splits):
    """cos_sin given: the kernel rotates q_pe's pairs itself, as attending with q_pe rotated beforehand."""
    context_lens, new_tokens = CASES[case]
    H, R, P = 4, 32, 16
    ql, qp, kv, tables, starts = paged_batch(context_lens, new_tokens, 4, H, R, P, torch.float32, seed=5)
    cos_sin = _angles(qp.shape[0], P, 6).to(DEVICE)
    ref = mla_attention_torch(ql, rotate_pairs_torch(qp, cos_sin), kv, tables, starts, context_lens, 0.25)
    out = mla_attention(ql, qp, kv, tables, i32(starts), i32(context_lens), 0.25, max(new_tokens),
                        max(context_lens), num_splits=splits, cos_sin=cos_sin)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("P", [8, 64])
def test_attention_rotates_q_pe_in_half_precision(P):
    """Rounded to the half dtype after the rotation, as the rotary kernel stores it (P = 8 pads the pairs)."""
    context_lens, new_tokens = [30, 7], [1, 5]
    ql, qp, kv, tables, starts = paged_batch(context_lens, new_tokens, 4, 5, 32, P, HALF, seed=7)
    cos_sin = _angles(qp.shape[0], P, 8).to(DEVICE)
    ref = mla_attention_torch(ql, rotate_pairs_torch(qp, cos_sin), kv, tables, starts, context_lens, 0.2)
    out = mla_attention(ql, qp, kv, tables, i32(starts), i32(context_lens), 0.2, 5, 30, cos_sin=cos_sin)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


# Triton 3.6's interpreter computes bf16 tl.dot wrongly (a plain 16x16 bf16 dot is off by 1e10 there), so on
# CPU the half-precision path is checked in float16, which runs the same kernel code; bf16 runs on the GPU.
HALF = torch.bfloat16 if torch.cuda.is_available() else torch.float16


@pytest.mark.parametrize("H, R, P", [(1, 32, 16), (20, 48, 8), (16, 64, 32)])
def test_attention_odd_dims_and_half(H, R, P):
    context_lens, new_tokens = [30, 7], [1, 5]
    for dtype, tol in [(torch.float32, 1e-5), (HALF, 2e-2)]:
        ql, qp, kv, tables, starts = paged_batch(context_lens, new_tokens, 4, H, R, P, dtype, seed=1)
        ref = mla_attention_torch(ql, qp, kv, tables, starts, context_lens, 0.2)
        out = mla_attention(ql, qp, kv, tables, i32(starts),
                            i32(context_lens), 0.2, 5, 30)
        torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("block_v", [16, 32])
def test_attention_value_chunks(block_v):
    """Programs that each accumulate a slice of the value dims give the same result."""
    context_lens, new_tokens = [30, 7, 1], [1, 5, 1]
    ql, qp, kv, tables, starts = paged_batch(context_lens, new_tokens, 4, 4, 64, 16, torch.float32, seed=2)
    ref = mla_attention_torch(ql, qp, kv, tables, starts, context_lens, 0.2)
    for splits in (1, 3):
        out = mla_attention(ql, qp, kv, tables, i32(starts), i32(context_lens), 0.2, 5, 30, num_splits=splits,
                            config=dict(block_v=block_v))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_attention_rejects_bad_inputs():
    ql, qp, kv, tables, starts = paged_batch([4], [1], 4, 2, 32, 16, torch.float32)
    args = (tables, i32(starts), i32([4]), 0.1, 1, 4)
    with pytest.raises(ValueError, match="shapes do not fit"):
        mla_attention(ql, qp[..., :8], kv, *args)
    with pytest.raises(TypeError, match="dtypes differ"):
        mla_attention(ql.bfloat16(), qp, kv, *args)
    with pytest.raises(ValueError, match="cos_sin must be"):
        mla_attention(ql, qp, kv, *args, cos_sin=torch.zeros(1, 4, 2, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("R, P", [(32, 16), (48, 8), (512, 64)])
def test_norm_rope_store_equals_twin_and_a_float64_reference(R, P, dtype):
    """kv_norm, the key rotation and the cache write in one launch: the twin against a float64 reference (RMS
    formula, rotation as complex multiplication), the kernel against the twin; other rows stay untouched."""
    g = torch.Generator().manual_seed(R + P)
    T = 5
    kv = (torch.randn(T, R + P, generator=g) * 2).to(dtype)
    weight = torch.rand(R, generator=g) + 0.5
    angles = torch.rand(T, P // 2, generator=g) * 6
    cos_sin = torch.stack([angles.cos(), angles.sin()], dim=-1)
    slots = torch.tensor([0, 7, 19, 3, 12])
    c = kv[:, :R].double()
    c = c / (c.square().mean(-1, keepdim=True) + 1e-6).sqrt() * weight.double()
    k = torch.view_as_complex(kv[:, R:].double().reshape(T, -1, 2).contiguous())
    k = torch.view_as_real(k * torch.polar(torch.ones_like(angles.double()), angles.double())).flatten(1)
    ref = torch.cat([c, k], dim=-1)
    twin = torch.full((5, 4, R + P), 7.0, dtype=dtype)
    norm_rope_store_torch(twin, slots, kv, weight, 1e-6, cos_sin)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(twin.view(-1, R + P)[slots].double(), ref, atol=tol, rtol=tol)
    got = torch.full((5, 4, R + P), 7.0, dtype=dtype, device=DEVICE)
    norm_rope_store(got, slots.to(DEVICE), kv.to(DEVICE), weight.to(DEVICE), 1e-6, cos_sin.to(DEVICE))
    torch.testing.assert_close(got.cpu().float(), twin.float(), atol=tol, rtol=tol)
    assert (got.view(-1, R + P)[[1, 2, 4]] == 7).all()                      # rows of no slot: untouched
    with pytest.raises(ValueError, match="cannot normalise"):
        norm_rope_store(got, slots.to(DEVICE), kv.to(DEVICE)[:, 1:], weight.to(DEVICE), 1e-6, cos_sin.to(DEVICE))
