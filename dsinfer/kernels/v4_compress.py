"""The DeepSeek-V4 KV compressor's pooling step (spec section 2.8), in Triton, and its PyTorch twin.

Each compressed entry pools its window of `slots` tokens (ratio, or 2 * ratio with overlap) per channel with a
softmax over the gate scores, is RMS-normalised and has its last rd channels rotated at its window's position:
    pooled[c] = sum_j softmax_j(score[j, c]) kv[j, c]                     float32, rounded to out_dtype
    y = pooled * rsqrt(mean(pooled^2) + eps) * w                          float32, rounded to out_dtype
    y[-rd:] = rotate interleaved pairs (y[2i], y[2i+1]) by angle i        float32, rounded to out_dtype
The three roundings are the model's (`pooled.to(x.dtype)`, RMSNorm, `apply_rotary`), so with out_dtype bfloat16
the rotary channels are rounded twice and the others once. Used at prefill; the Hadamard / QAT steps after it
(`finish_torch`) stay in torch there.

The decode update (`compress_decode`, one new token per sequence against every sequence's buffers) is one
kernel: it buffers the token's projections (gate scores plus the position bias) in its window's slot, and where
the token completes a window ((p + 1) % ratio == 0) pools it as above, finishes it (the indexer's Hadamard
rotation and FP4 rounding, or the FP8 rounding of the non-rotary dims) and stores it as entry p // ratio; with
overlap it first reads the previous window's first halves (none in window 0) and then keeps this window's in
their place. Rows that complete no window stop after the buffering. Twin: `compress_decode_torch`, the same steps
as tensor ops without a host value (every row pooled, written back only where complete).
"""

from __future__ import annotations

import torch

from .fp4 import fp4_act_quant_dequant_torch, fp8_act_quant_dequant_torch
from .norm_rope import rms_norm_torch, rotate_pairs_torch
from .triton_common import check_device, check_tensor

KV_QAT_BLOCK = 64        # FP8 QAT block of the key/value non-rotary dims

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def compress_pool_torch(kv: torch.Tensor, score: torch.Tensor, norm_weight: torch.Tensor, cos_sin: torch.Tensor,
                        eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """kv, score: (n, slots, d) float32 (score may be -inf, never a whole column); norm_weight: (d,) float32;
    cos_sin: (n, rd/2, 2) float32, the rope table at each entry's position. Returns (n, d) out_dtype."""
    pooled = (kv * score.softmax(dim=1)).sum(dim=1)                            # (n, d) float32
    entries = rms_norm_torch(pooled.to(out_dtype), norm_weight, eps)
    rd = 2 * cos_sin.shape[1]
    return torch.cat([entries[:, :-rd], rotate_pairs_torch(entries[:, -rd:], cos_sin)], dim=-1)


def compress_pool(kv: torch.Tensor, score: torch.Tensor, norm_weight: torch.Tensor, cos_sin: torch.Tensor,
                  eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """The Triton kernel; arguments and result as compress_pool_torch (d and rd even, 0 < rd <= d)."""
    check_tensor("kv", kv, (torch.float32,), 3)
    check_tensor("score", score, (torch.float32,), 3)
    check_tensor("norm_weight", norm_weight, (torch.float32,), 1)
    check_tensor("cos_sin", cos_sin, (torch.float32,), 3)
    check_device(kv=kv, score=score, norm_weight=norm_weight, cos_sin=cos_sin)
    if out_dtype not in OUT_DTYPES:
        allowed = ", ".join(str(t).removeprefix("torch.") for t in OUT_DTYPES)
        raise TypeError(f"out_dtype must be {allowed}; got {out_dtype}")
    n, slots, d = kv.shape
    if (score.shape != kv.shape or norm_weight.shape[0] != d or cos_sin.shape[0] != n or cos_sin.shape[2] != 2
            or slots == 0):
        raise ValueError(f"shapes do not agree: kv {tuple(kv.shape)}, score {tuple(score.shape)}, norm_weight "
                         f"{tuple(norm_weight.shape)}, cos_sin {tuple(cos_sin.shape)}; want (n, slots > 0, d), "
                         "(n, slots, d), (d,), (n, rd/2, 2)")
    rd = 2 * cos_sin.shape[1]
    if d % 2 or not 0 < rd <= d:
        raise ValueError(f"need an even d and 0 < rd <= d (rd = 2 * cos_sin.shape[1]); got d={d}, rd={rd}")
    out = torch.empty(n, d, dtype=out_dtype, device=kv.device)
    if n:
        from .v4_compress_triton import launch
        launch(kv, score, norm_weight, cos_sin, float(eps), out)
    return out


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform over the last dim (a power of two), in float32, in x's dtype."""
    d = x.shape[-1]
    y = x.float().reshape(-1, d)
    h = 1
    while h < d:                                                    # butterflies: (a, b) -> (a + b, a - b)
        y = y.view(-1, d // (2 * h), 2, h)
        y = torch.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], dim=2)
        h *= 2
    return (y.view(x.shape) * d ** -0.5).to(x.dtype)


def finish_torch(entries: torch.Tensor, rope_dim: int, rotate: bool, qat: bool) -> torch.Tensor:
    """Pooled entries (n, d) -> as stored: the indexer's (rotate) Hadamard-transformed, FP4-rounded under QAT; the
    attention's FP8-rounded on the non-rotary dims under QAT (ue8m0 scales per KV_QAT_BLOCK)."""
    if rotate:
        entries = hadamard(entries)
        return fp4_act_quant_dequant_torch(entries) if qat else entries
    if qat:
        rd = rope_dim
        return torch.cat([fp8_act_quant_dequant_torch(entries[:, :-rd], KV_QAT_BLOCK), entries[:, -rd:]], -1)
    return entries


def compress_decode_torch(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, positions: torch.Tensor,
                          slots: torch.Tensor, kv_buf: torch.Tensor, score_buf: torch.Tensor,
                          prev_kv: torch.Tensor | None, prev_score: torch.Tensor | None, norm_weight: torch.Tensor,
                          rope_table: torch.Tensor, entries: torch.Tensor, entry_rows: torch.Tensor, eps: float,
                          rotate: bool, qat: bool) -> None:
    """kv, score: (B, width) float32 projections of each row's new token (score without the position bias) at
    positions (B,) int64 of state slots (B,) int64; ape (ratio, width) float32; kv_buf, score_buf (slots, ratio,
    width) float32; with overlap (width = 2d) prev_kv, prev_score (slots, ratio, d) float32, else None;
    norm_weight (d,) float32; rope_table (positions, rd/2, 2) float32; entries (rows, d), written in their dtype;
    entry_rows (B, E) int64: where entry w of row b lies in entries (E > every p // ratio). Updates the buffers,
    prev and entries in place."""
    m, d = kv_buf.shape[1], norm_weight.shape[0]
    p = positions
    at = p % m
    kv_buf[slots, at] = kv
    score_buf[slots, at] = score + ape[at]
    wkv, wscore = kv_buf[slots], score_buf[slots]                                        # (B, m, width)
    complete = (p + 1) % m == 0
    if prev_kv is not None:  # slots: the previous window's first halves (none in window 0), then this one's second
        first = (p < m)[:, None, None]
        pk, ps = prev_kv[slots].masked_fill(first, 0.0), prev_score[slots].masked_fill(first, float("-inf"))
        keep = complete[:, None, None]
        prev_kv[slots] = torch.where(keep, wkv[..., :d], prev_kv[slots])
        prev_score[slots] = torch.where(keep, wscore[..., :d], prev_score[slots])
        wkv, wscore = torch.cat([pk, wkv[..., d:]], dim=1), torch.cat([ps, wscore[..., d:]], dim=1)
    pooled = compress_pool_torch(wkv, wscore, norm_weight, rope_table[p // m * m], eps, entries.dtype)
    new = finish_torch(pooled, 2 * rope_table.shape[1], rotate, qat)
    rows = entry_rows.gather(1, (p // m)[:, None]).squeeze(1)
    entries[rows] = torch.where(complete[:, None], new, entries[rows])


def compress_decode(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, positions: torch.Tensor,
                    slots: torch.Tensor, kv_buf: torch.Tensor, score_buf: torch.Tensor, prev_kv: torch.Tensor | None,
                    prev_score: torch.Tensor | None, norm_weight: torch.Tensor, rope_table: torch.Tensor,
                    entries: torch.Tensor, entry_rows: torch.Tensor, eps: float, rotate: bool, qat: bool) -> None:
    """The Triton kernel; arguments and effect as compress_decode_torch (all contiguous, but kv and score may be
    column slices of one (B, 2 width) projection: rows of one stride, columns contiguous; d a power of two to
    rotate; d - rd a multiple of KV_QAT_BLOCK for the FP8 rounding)."""
    for name, t in (("kv", kv), ("score", score)):
        check_tensor(name, t if t.dim() != 2 or t.stride(1) != 1 else t[:1], (torch.float32,), 2)   # rows may lie apart
    if score.stride(0) != kv.stride(0):
        raise ValueError(f"kv and score rows must have one stride; got {kv.stride(0)} and {score.stride(0)}")
    for name, t in (("ape", ape), ("kv_buf", kv_buf), ("score_buf", score_buf), ("norm_weight", norm_weight),
                    ("rope_table", rope_table)):
        check_tensor(name, t, (torch.float32,))
    check_tensor("positions", positions, (torch.int64,), 1)
    check_tensor("slots", slots, (torch.int64,), 1)
    check_tensor("entry_rows", entry_rows, (torch.int64,), 2)
    check_tensor("entries", entries, OUT_DTYPES, 2)
    check_device(kv=kv, score=score, kv_buf=kv_buf, entries=entries, entry_rows=entry_rows, positions=positions)
    B, width = kv.shape
    m, d, rd = kv_buf.shape[1], norm_weight.shape[0], 2 * rope_table.shape[1]
    overlap = prev_kv is not None
    if overlap:
        check_tensor("prev_kv", prev_kv, (torch.float32,), 3)
        check_tensor("prev_score", prev_score, (torch.float32,), 3)
    want = {"score": (score.shape, (B, width)), "ape": (ape.shape, (m, width)), "slots": (slots.shape, (B,)),
            "positions": (positions.shape, (B,)), "score_buf": (score_buf.shape, kv_buf.shape),
            "kv_buf": (kv_buf.shape[2:], (width,)), "entries": (entries.shape[1:], (d,)),
            "entry_rows": (entry_rows.shape[:1], (B,)), "width": ((width,), ((2 if overlap else 1) * d,))}
    if overlap:
        want |= {"prev_kv": (prev_kv.shape, (kv_buf.shape[0], m, d)), "prev_score": (prev_score.shape,
                                                                                     (kv_buf.shape[0], m, d))}
    bad = [f"{k} {tuple(got)} (want {tuple(w)})" for k, (got, w) in want.items() if tuple(got) != tuple(w)]
    if bad:
        raise ValueError("shapes do not agree: " + ", ".join(bad))
    if (d % 2 or not 0 < rd <= d or (rotate and d & (d - 1)) or (qat and not rotate and (d - rd) % KV_QAT_BLOCK)
            or (overlap and m & (m - 1))):
        raise ValueError(f"need an even d, 0 < rd <= d, a power-of-two d to rotate, d - rd a multiple of "
                         f"{KV_QAT_BLOCK} for the FP8 rounding and a power-of-two ratio with overlap; got d={d}, "
                         f"rd={rd}, ratio={m}")
    if B:
        from .v4_compress_triton import launch_decode
        launch_decode(kv, score, ape, positions, slots, kv_buf, score_buf, prev_kv, prev_score, norm_weight,
                      rope_table, entries, entry_rows, float(eps), rotate, qat)
