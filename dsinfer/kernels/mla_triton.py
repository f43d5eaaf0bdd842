"""Absorbed-MLA attention over the paged latent cache, in Triton: decode, prefill and chunked prefill.

Design: every head of every new token is one query row against the same single-head latent KV (MLA is
multi-query attention with a 576-dim key and a 512-dim value that is the key's first 512 dims). A program
takes a tile of BLOCK_T tokens x BLOCK_H heads of one sequence and streams that sequence's cached rows
through page lookups, with an online softmax in float32. For decode (few rows, long contexts) the context is
split into `num_splits` ranges run by separate programs whose partial outputs are merged by log-sum-exp.
The query's rotary part can be rotated in the kernel (`cos_sin`), so decode needs no separate rotary launch.
Causality: the new tokens are the last ones of the context, so query t of a sequence with q_len new tokens and
context_len cached-plus-new tokens sees keys 0 .. context_len - q_len + t.

PyTorch twin: kernels.mla_attention.mla_attention_torch.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs run the PyTorch twins
    triton = None


def triton_available() -> bool:
    return triton is not None


def _triton_jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_triton_jit
def _mla_attention_kernel(
    QL, QP, CS, KV, BlockTables, CuSeqQ, SeqLens, Out, Lse,                   # pointers
    H, num_splits, min_split_len, sm_scale_log2,                             # sizes
    stride_qlt, stride_qlh, stride_qpt, stride_qph, stride_cst,
    stride_kvp, stride_kvs, stride_bt,
    stride_os, stride_ot, stride_oh, stride_ls, stride_lt,                   # strides
    PAGE_SIZE: tl.constexpr, R: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    SPLIT: tl.constexpr, ROPE: tl.constexpr, IEEE: tl.constexpr,            # constexprs
):
    # axis 0: head block x value chunk (a program accumulates BLOCK_V of the R output dims; the scores need all
    # of q and k, so chunks recompute them, but their accumulators are smaller and more programs fit an SM)
    NUM_V: tl.constexpr = BLOCK_R // BLOCK_V
    pid_hv, pid_t, pid_bs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pid_h, pid_v = pid_hv // NUM_V, pid_hv % NUM_V
    b = pid_bs // num_splits
    s = pid_bs % num_splits
    q_start = tl.load(CuSeqQ + b)
    q_len = tl.load(CuSeqQ + b + 1) - q_start
    t0 = pid_t * BLOCK_T
    if t0 >= q_len:
        return
    ctx = tl.load(SeqLens + b)
    BLOCK_M: tl.constexpr = BLOCK_T * BLOCK_H
    offs_m = tl.arange(0, BLOCK_M)
    t = t0 + offs_m // BLOCK_H                                  # token of each row (within the sequence)
    h = pid_h * BLOCK_H + offs_m % BLOCK_H                      # head of each row
    row_ok = (t < q_len) & (h < H)
    pos = ctx - q_len + t                                       # last key each row may see
    # this sequence's context is cut into up to num_splits equal ranges, one per min_split_len keys (fewer for
    # short contexts; programs past the last range only mark their rows empty, which the merge then skips), so
    # one launch shape (a CUDA graph) serves every context length
    seq_splits = tl.maximum(1, tl.minimum(num_splits, tl.cdiv(ctx, min_split_len)))
    if s >= seq_splits:
        tl.store(Lse + s * stride_ls + (q_start + t) * stride_lt + h, float("-inf"), mask=row_ok & (pid_v == 0))
        return
    split_len = tl.cdiv(tl.cdiv(ctx, seq_splits), BLOCK_N) * BLOCK_N
    kv_lo = s * split_len
    kv_hi = tl.minimum(ctx, kv_lo + split_len)
    kv_hi = tl.minimum(kv_hi, ctx - q_len + tl.minimum(t0 + BLOCK_T, q_len))   # causal bound of the tile

    offs_r = tl.arange(0, BLOCK_R)                              # latent dims (padded to a power of two)
    offs_p = tl.arange(0, BLOCK_P)                              # rotary dims
    r_ok, p_ok = offs_r < R, offs_p < P
    tok = q_start + t
    ql = tl.load(QL + tok[:, None] * stride_qlt + h[:, None] * stride_qlh + offs_r[None, :],
                 mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    if ROPE:    # rotate the query's pairs (x[2i], x[2i+1]) by angle i in float32, rounded as the rotary kernel does
        offs_i = tl.arange(0, BLOCK_P // 2)
        pair_ok = row_ok[:, None] & (offs_i < P // 2)[None, :]
        qp_ptr = QP + tok[:, None] * stride_qpt + h[:, None] * stride_qph + 2 * offs_i[None, :]
        x0 = tl.load(qp_ptr, mask=pair_ok, other=0.0).to(tl.float32)
        x1 = tl.load(qp_ptr + 1, mask=pair_ok, other=0.0).to(tl.float32)
        cs_ptr = CS + tok[:, None] * stride_cst + 2 * offs_i[None, :]
        cos = tl.load(cs_ptr, mask=pair_ok, other=0.0)
        sin = tl.load(cs_ptr + 1, mask=pair_ok, other=0.0)
        r0 = (x0 * cos - x1 * sin).to(QP.dtype.element_ty)
        r1 = (x0 * sin + x1 * cos).to(QP.dtype.element_ty)
        qp = tl.reshape(tl.join(r0, r1), [BLOCK_M, BLOCK_P])                   # pairs interleaved again
    else:
        qp = tl.load(QP + tok[:, None] * stride_qpt + h[:, None] * stride_qph + offs_p[None, :],
                     mask=row_ok[:, None] & p_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = offs_v < R
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    for n0 in range(kv_lo, kv_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_hi
        page = tl.load(BlockTables + b * stride_bt + offs_n // PAGE_SIZE, mask=n_ok, other=0)
        row = page.to(tl.int64) * stride_kvp + (offs_n % PAGE_SIZE) * stride_kvs
        c = tl.load(KV + row[:, None] + offs_r[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)   # (N, R)
        kp = tl.load(KV + row[:, None] + R + offs_p[None, :], mask=n_ok[:, None] & p_ok[None, :], other=0.0)
        if NUM_V == 1:
            cv = c
        else:
            cv = tl.load(KV + row[:, None] + offs_v[None, :], mask=n_ok[:, None] & v_ok[None, :], other=0.0)
        if IEEE:
            qk = tl.dot(ql, tl.trans(c), input_precision="ieee") + tl.dot(qp, tl.trans(kp), input_precision="ieee")
        else:
            qk = tl.dot(ql, tl.trans(c)) + tl.dot(qp, tl.trans(kp))
        qk = qk * sm_scale_log2
        visible = (offs_n[None, :] <= pos[:, None]) & n_ok[None, :]
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(cv.dtype), cv, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(cv.dtype), cv)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptr = Out + s * stride_os + tok[:, None] * stride_ot + h[:, None] * stride_oh + offs_v[None, :]
    tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & v_ok[None, :])
    if SPLIT:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(Lse + s * stride_ls + tok * stride_lt + h, lse, mask=row_ok & (pid_v == 0))


@_triton_jit
def _merge_kernel(Partial, Lse, Out, num_splits, stride_ps, stride_pt, stride_ph, stride_ls, stride_lt,
                  stride_ot, stride_oh, R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                  CHUNK_S: tl.constexpr):
    """One (token, head) row: combine the splits' normalised partial outputs by their log-sum-exps (base 2).
    All LSEs are read as one vector; partials are read CHUNK_S splits at a time, only up to the last non-empty
    split (a range past the sequence's last, or with no visible key, has LSE -inf and is never read)."""
    t, h = tl.program_id(0), tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    lse = tl.load(Lse + offs_s * stride_ls + t * stride_lt + h, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.sum(tl.exp2(lse - m), 0)
    n_used = tl.max(tl.where(lse > float("-inf"), offs_s + 1, 0), 0)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R], tl.float32)
    for s0 in range(0, n_used, CHUNK_S):
        s = s0 + tl.arange(0, CHUNK_S)
        ls = tl.load(Lse + s * stride_ls + t * stride_lt + h, mask=s < n_used, other=float("-inf"))
        used = ls > float("-inf")
        part = tl.load(Partial + s[:, None] * stride_ps + t * stride_pt + h * stride_ph + offs_r[None, :],
                       mask=used[:, None] & (offs_r < R)[None, :], other=0.0)                  # (CHUNK_S, R)
        acc += tl.sum(tl.exp2(ls - m)[:, None] * part, 0)
    out = acc / tl.where(denom == 0.0, 1.0, denom)
    tl.store(Out + t * stride_ot + h * stride_oh + offs_r, out.to(Out.dtype.element_ty), mask=offs_r < R)


PROGRAMS = 132      # decode programs to aim for: one per H100/H200 SM (a program's float32 accumulator and its
                    # double-buffered latent tiles fill an SM: 8 splits of batch 16 x 128 heads ran slower than 4)


def min_split_len(num_heads: int) -> int:
    """Keys per split at least: one 64-key tile, and no fewer keys than heads, so a split's float32 partial
    output (H x R) stays within about twice the latents it reads. A program streams its range serially, so
    shorter splits spread a short context over more programs (V2-Lite, 16 heads, 2080 keys: 13.7 us in 64-key
    splits, 20.9 us in 256-key ones; V3, 128 heads, 4096 keys: 21.5 us in 128-key splits, 29.4 in 256)."""
    return max(64, 1 << (num_heads - 1).bit_length())


def _num_splits(num_seqs: int, head_blocks: int, max_query_len: int, max_seq_len: int, min_split: int) -> int:
    """Enough programs to fill the GPU once when there are few rows (decode), in splits of at least min_split
    keys; one split for prefills."""
    if max_query_len > 1:
        return 1
    want = PROGRAMS // (num_seqs * head_blocks)
    return max(1, min(want, -(-max_seq_len // min_split), 64))


def mla_attention(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float, max_query_len: int,
                  max_seq_len: int, num_splits: int | None = None, config: dict | None = None,
                  cos_sin: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed MLA attention, (T, H, R) out in q_latent's dtype.

    q_latent: (T, H, R) and q_pe: (T, H, P), each row's last dim contiguous; kv_cache: (pages, page_size, R + P)
    contiguous, same dtype as q; block_tables: (B, max_pages) int32; cu_seqlens_q: (B + 1,) int32 offsets of each
    sequence's rows; seq_lens: (B,) int32 context lengths (cached + new). max_query_len / max_seq_len bound the
    grid (host ints, so the launch needs no device sync). cos_sin: (T, P/2, 2) float32 contiguous, or None: q_pe
    is not yet rotated, and the kernel rotates its pairs as `norm_rope.rotate_pairs_torch` does (rounded to q's
    dtype). `config` overrides the launch parameters (block_h, block_n, block_v, num_warps, num_stages,
    min_split_len) for tuning.
    """
    if triton is None:
        raise RuntimeError("triton is not installed; use the PyTorch attention twin")
    T, H, R = q_latent.shape
    P = q_pe.shape[-1]
    if q_pe.shape[:2] != (T, H) or kv_cache.shape[-1] != R + P:
        raise ValueError(f"shapes do not fit: q_latent {tuple(q_latent.shape)}, q_pe {tuple(q_pe.shape)}, "
                         f"kv_cache {tuple(kv_cache.shape)}")
    if q_latent.dtype != kv_cache.dtype or q_pe.dtype != kv_cache.dtype:
        raise TypeError(f"q and kv_cache dtypes differ: {q_latent.dtype}, {q_pe.dtype}, {kv_cache.dtype}")
    if q_latent.stride(-1) != 1 or q_pe.stride(-1) != 1 or not kv_cache.is_contiguous():
        raise ValueError("q_latent, q_pe need a contiguous last dim and kv_cache must be contiguous")
    if cos_sin is not None and (cos_sin.shape != (T, P // 2, 2) or cos_sin.dtype != torch.float32
                                or cos_sin.stride(-1) != 1 or cos_sin.stride(-2) != 2 or P % 2):
        raise ValueError(f"cos_sin must be a float32 (T, P/2, 2) = ({T}, {P // 2}, 2) tensor with contiguous last "
                         f"dims, got {tuple(cos_sin.shape)} {cos_sin.dtype}")
    num_seqs = seq_lens.shape[0]
    out = torch.empty_like(q_latent)
    if T == 0 or num_seqs == 0:
        return out
    # Measured on an H100 for V3 shapes (benchmarks/bench_mla_decode.py --sweep): 64 heads a program and 64-key
    # tiles read the latents fewest times; small test shapes take small tiles.
    big = R >= 256
    cfg = {"block_h": 64 if big else 16, "block_n": 64 if big else 32, "block_v": 512, "num_warps": 8 if big else 4,
           "num_stages": 2, "min_split_len": min_split_len(H), **(config or {})}
    block_h = min(cfg["block_h"], triton.next_power_of_2(H))
    block_t = max(1, min(16 // block_h, triton.next_power_of_2(max_query_len)))   # at least 16 rows a tile
    block_n = cfg["block_n"]
    block_r = max(16, triton.next_power_of_2(R))
    block_v = min(cfg["block_v"], block_r)
    head_blocks = -(-H // block_h) * (block_r // block_v)       # programs per token tile: heads x value chunks
    splits = num_splits or _num_splits(num_seqs, head_blocks, max_query_len, max_seq_len, cfg["min_split_len"])
    min_split = 1 if num_splits else cfg["min_split_len"]
    if splits > 1:
        partial = torch.empty(splits, T, H, R, dtype=torch.float32, device=q_latent.device)
        lse = torch.empty(splits, T, H, dtype=torch.float32, device=q_latent.device)
    else:
        partial, lse = out.unsqueeze(0), out.new_empty(1, 1, 1, dtype=torch.float32)
    grid = (head_blocks, -(-max_query_len // block_t), num_seqs * splits)
    _mla_attention_kernel[grid](
        q_latent, q_pe, q_pe if cos_sin is None else cos_sin, kv_cache, block_tables, cu_seqlens_q, seq_lens,
        partial, lse, H, splits, min_split, scale * math.log2(math.e),
        q_latent.stride(0), q_latent.stride(1), q_pe.stride(0), q_pe.stride(1),
        0 if cos_sin is None else cos_sin.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), block_tables.stride(0),
        partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
        PAGE_SIZE=kv_cache.shape[1], R=R, P=P, BLOCK_R=block_r,
        BLOCK_P=max(16, triton.next_power_of_2(P)), BLOCK_H=block_h, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_V=block_v,
        SPLIT=splits > 1, ROPE=cos_sin is not None, IEEE=q_latent.dtype == torch.float32, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    if splits > 1:
        block_s = triton.next_power_of_2(splits)
        _merge_kernel[(T, H)](partial, lse, out, splits, partial.stride(0), partial.stride(1), partial.stride(2),
                              lse.stride(0), lse.stride(1), out.stride(0), out.stride(1), R=R,
                              BLOCK_R=triton.next_power_of_2(R), BLOCK_S=block_s, CHUNK_S=min(block_s, 8),
                              num_warps=4)
    return out
