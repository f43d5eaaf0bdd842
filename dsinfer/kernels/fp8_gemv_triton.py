"""The Triton kernel of fp8_gemv.py (imported on first use: it imports triton).

A program holds BLOCK_N weight rows (inside one 128-row scale block) and walks K in chunks of BLOCK_K bytes (whole
128-wide scale groups), the weight read as 32-bit words of four e4m3 bytes and the bf16 activation as 64-bit words
of four, unmasked where the chunk divides K so that the loads vectorize (masked loads of single words ran at half
the speed). The activation chunk is quantized in registers exactly as act_quant does it (amax per group, IEEE
division, or a multiply by the power-of-two reciprocal with ue8m0 scales, round to e4m3; every program repeats
this on a row that sits in L2) and multiplied by its two block scales: one per 128 columns for the whole program.
The e4m3 weight bytes are decoded with integer shifts and a mask (three instructions a byte, two for the top one;
the sign and the seven exponent/mantissa bits placed separately took four: the loop of the 16-row, 1024-byte
program went from 817 to 690 SASS instructions, `tools/compile_sm90.py --loops`): placed as a float32's, they read
exactly e4m3(byte) * 2^-120 (subnormals included, as float32 subnormals, which a GPU's fp32
multiply keeps); multiplied by the scaled activation times 2^63, every product is a normal float32, accumulated
per lane and summed once at the end, times 2^57. No conversion instruction and no FP8 hardware: the same kernel
serves GPUs without FP8 tensor cores. E4m3's NaN bytes (0x7F, 0xFF) are not decoded as NaN; published weights
hold none.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_quant_triton import _act_scale, _round_to_e4m3


@triton.jit
def _e4m3_bytes(u):
    """uint32 words of four e4m3 bytes -> four float32 tensors e4m3(byte j) * 2^-120, exactly (byte j of word i is
    element 4i + j): byte j shifted to the top, an arithmetic shift right by 4 puts its sign at bit 31 (copied into
    bits 30-27) and its exponent and mantissa at bits 26-20, and one mask clears the copies."""
    b0 = ((u << 24).to(tl.int32, bitcast=True) >> 4).to(tl.uint32, bitcast=True) & 0x87F00000
    b1 = ((u << 16).to(tl.int32, bitcast=True) >> 4).to(tl.uint32, bitcast=True) & 0x87F00000
    b2 = ((u << 8).to(tl.int32, bitcast=True) >> 4).to(tl.uint32, bitcast=True) & 0x87F00000
    b3 = (u.to(tl.int32, bitcast=True) >> 4).to(tl.uint32, bitcast=True) & 0x87F00000
    return (b0.to(tl.float32, bitcast=True), b1.to(tl.float32, bitcast=True), b2.to(tl.float32, bitcast=True),
            b3.to(tl.float32, bitcast=True))


@triton.jit
def _x_chunk(x_row, k0, words, BLOCK_W: tl.constexpr, EVEN: tl.constexpr, QUANT: tl.constexpr,
             UE8M0: tl.constexpr):
    """The bf16 activation chunk k0 .. k0 + 4 BLOCK_W, read as 64-bit words of four, as four (BLOCK_W,) float32
    vectors (element 4i + j in vector j; bf16 -> float32 is a 16-bit shift), quantized as act_quant quantizes it
    (QUANT: groups of 128 = 32 words, s = max(amax, 1e-4) / 448, q = e4m3(x / s)) and multiplied back by s and by
    2^63."""
    GK: tl.constexpr = BLOCK_W // 32
    i = k0 // 4 + tl.arange(0, BLOCK_W)
    if EVEN:
        u = tl.load(x_row + i)
    else:
        u = tl.load(x_row + i, mask=i < words, other=0)
    u = u.to(tl.uint64, bitcast=True)
    x0 = ((u << 16) & 0xFFFF0000).to(tl.uint32).to(tl.float32, bitcast=True)
    x1 = (u & 0xFFFF0000).to(tl.uint32).to(tl.float32, bitcast=True)
    x2 = ((u >> 16) & 0xFFFF0000).to(tl.uint32).to(tl.float32, bitcast=True)
    x3 = ((u >> 32) & 0xFFFF0000).to(tl.uint32).to(tl.float32, bitcast=True)
    scale = tl.full((BLOCK_W,), 2.0 ** 63, tl.float32)
    if QUANT:
        amax = tl.maximum(tl.maximum(tl.abs(x0), tl.abs(x1)), tl.maximum(tl.abs(x2), tl.abs(x3)))
        s = _act_scale(tl.max(tl.reshape(amax, (GK, 32)), axis=1), UE8M0)    # ue8m0: x / s = x * (1 / s)
        s = tl.reshape(tl.broadcast_to(s[:, None], (GK, 32)), (BLOCK_W,))
        if UE8M0:
            r = 1.0 / s
            x0 = _round_to_e4m3(tl.clamp(x0 * r, -448.0, 448.0))
            x1 = _round_to_e4m3(tl.clamp(x1 * r, -448.0, 448.0))
            x2 = _round_to_e4m3(tl.clamp(x2 * r, -448.0, 448.0))
            x3 = _round_to_e4m3(tl.clamp(x3 * r, -448.0, 448.0))
        else:
            x0 = _round_to_e4m3(tl.clamp(tl.math.div_rn(x0, s), -448.0, 448.0))
            x1 = _round_to_e4m3(tl.clamp(tl.math.div_rn(x1, s), -448.0, 448.0))
            x2 = _round_to_e4m3(tl.clamp(tl.math.div_rn(x2, s), -448.0, 448.0))
            x3 = _round_to_e4m3(tl.clamp(tl.math.div_rn(x3, s), -448.0, 448.0))
        scale = scale * s
    return x0 * scale, x1 * scale, x2 * scale, x3 * scale


@triton.jit
def _w_scale(w_s_row, k0, groups, BLOCK_W: tl.constexpr):
    """The weight block scale of each word of the chunk, (BLOCK_W,): the program's rows share a 128-row block."""
    GK: tl.constexpr = BLOCK_W // 32
    g = k0 // 128 + tl.arange(0, GK)
    ws = tl.load(w_s_row + g, mask=g < groups, other=0.0)
    return tl.reshape(tl.broadcast_to(ws[:, None], (GK, 32)), (BLOCK_W,))


@triton.jit
def _dot_words(acc, w_ptrs, w_ok, ws, x0, x1, x2, x3, EVEN: tl.constexpr):
    """acc (BLOCK_N, BLOCK_W) += the products of a chunk of weight words with the scaled activations."""
    if EVEN:
        u = tl.load(w_ptrs)
    else:
        u = tl.load(w_ptrs, mask=w_ok, other=0)
    b0, b1, b2, b3 = _e4m3_bytes(u.to(tl.uint32, bitcast=True))
    return acc + b0 * (x0 * ws)[None, :] + b1 * (x1 * ws)[None, :] + b2 * (x2 * ws)[None, :] + \
        b3 * (x3 * ws)[None, :]


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, w_ptr, w_s_ptr, w3_ptr, w3_s_ptr, out_ptr, slots_ptr, idx_ptr,
    N, K, ROWS_PER_GROUP, stride_wn, stride_sn, first, n_local,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, EVEN: tl.constexpr, QUANT: tl.constexpr, UE8M0: tl.constexpr,
    GATED: tl.constexpr, SWIGLU_LIMIT: tl.constexpr, ACCUMULATE: tl.constexpr, TOP_K: tl.constexpr,
):
    """out[n] for BLOCK_N rows (within one 128-row scale block); x read as int64 words, w as int32 words (strides
    in words). EVEN: K is a multiple of 4 BLOCK_W (no masks, so the loads vectorize)."""
    ACC_SCALE: tl.constexpr = 2.0 ** 57       # 2^120 / 2^63
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    safe_n = (offs_n % N).to(tl.int64)
    words = K // 4
    x_row = x_ptr + (n0 // ROWS_PER_GROUP).to(tl.int64) * words         # the group's slice of x
    s_row = (n0 // 128) * stride_sn
    offs_w = tl.arange(0, BLOCK_W)
    w_ptrs = w_ptr + safe_n[:, None] * stride_wn + offs_w[None, :]
    w3_ptrs = w3_ptr + safe_n[:, None] * stride_wn + offs_w[None, :]
    groups = tl.cdiv(K, 128)
    acc = tl.zeros((BLOCK_N, BLOCK_W), tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_W), tl.float32)
    for k0 in range(0, K, 4 * BLOCK_W):
        w_ok = (k0 // 4 + offs_w < words)[None, :]
        x0, x1, x2, x3 = _x_chunk(x_row, k0, words, BLOCK_W, EVEN, QUANT, UE8M0)
        acc = _dot_words(acc, w_ptrs, w_ok, _w_scale(w_s_ptr + s_row, k0, groups, BLOCK_W), x0, x1, x2, x3, EVEN)
        if GATED:
            acc3 = _dot_words(acc3, w3_ptrs, w_ok, _w_scale(w3_s_ptr + s_row, k0, groups, BLOCK_W),
                              x0, x1, x2, x3, EVEN)
        w_ptrs += BLOCK_W
        w3_ptrs += BLOCK_W
    y = tl.sum(acc, axis=1) * ACC_SCALE
    if GATED:
        up = tl.sum(acc3, axis=1) * ACC_SCALE
        if SWIGLU_LIMIT > 0:
            y = tl.minimum(y, SWIGLU_LIMIT)
            up = tl.minimum(tl.maximum(up, -SWIGLU_LIMIT), SWIGLU_LIMIT)
        y = y / (1.0 + tl.exp(-y)) * up
    n_ok = offs_n < N
    if ACCUMULATE:
        y += tl.load(out_ptr + offs_n, mask=n_ok, other=0.0)
    for j in range(TOP_K):                    # routed slots (TOP_K > 0), in slot order; other ranks' skipped
        e = tl.load(idx_ptr + j) - first
        y += tl.load(slots_ptr + j * N + offs_n, mask=n_ok & (e >= 0) & (e < n_local), other=0.0)
    tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_ok)


def launch(x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, w3: torch.Tensor | None, w3_s: torch.Tensor | None,
           out: torch.Tensor, quantize: bool, ue8m0: bool, groups: int, swiglu_limit: float, accumulate: bool,
           routed: tuple | None) -> None:
    """Checked by fp8_gemv.fp8_gemv (x bf16, K a multiple of 4, 8- and 4-byte aligned); writes (or adds into) out
    (1, N)."""
    N, K = w.shape
    block_n, block_k, warps = gemv_config(N, K, groups)
    gated = w3 is not None
    wb = w.view(torch.int32)                                  # four bytes a word
    slots, idx, first, n_local = routed if routed is not None else (out, out, 0, 0)
    _fp8_gemv_kernel[(triton.cdiv(N, block_n),)](
        x.view(torch.int64), wb, w_s, w3.view(torch.int32) if gated else wb, w3_s if gated else w_s, out, slots,
        idx, N, K, N // groups, wb.stride(0), w_s.stride(0), first, n_local,
        BLOCK_N=block_n, BLOCK_W=block_k // 4, EVEN=K % block_k == 0, QUANT=quantize, UE8M0=ue8m0, GATED=gated,
        SWIGLU_LIMIT=swiglu_limit if gated else 0.0, ACCUMULATE=accumulate,
        TOP_K=0 if routed is None else idx.numel(), num_warps=warps)


def gemv_config(N: int, K: int, groups: int = 1, programs: int = 264) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps): the most rows (up to 16) that still give `programs` programs (two per SM of
    an H100), rows dividing a group's; chunks of 1024 bytes a row (2048 below 8 rows), halved down to 128 until
    they divide K (no masks). Fitted to `benchmarks/bench_fp8_gemv.py --configs` on an H200."""
    rows = N // groups
    block_n = 16
    while block_n > 2 and (triton.cdiv(N, block_n) < programs or (groups > 1 and rows % block_n)):
        block_n //= 2
    block_k = min(1024 if block_n >= 8 else 2048, triton.next_power_of_2(K))
    while block_k > 128 and K % block_k:
        block_k //= 2
    return block_n, max(block_k, 128), 4
