"""DeepSeek-V4's FP4 routed experts at one token (batch-1 decode): each of the token's k slots is a matrix-vector
product, run without tensor cores. `fused_moe` calls this for T = 1 in mode "fp4_weight_only"; its torch twin is
`fused_moe_torch`, as for the grouped GEMMs.

Why not the grouped GEMM: at one row the tensor-core dot decodes every weight to bf16 in the MMA layout and then
multiplies 15 rows of zeros; the decode is what limits it (112 us for V4-Flash's 6 experts of 4096 x 2048, 0.7
TB/s, against 48 us here: benchmarks/sweep_fp4_moe.py). Here a program holds BLOCK_N output rows and walks K
in chunks of BLOCK_B packed bytes, read as 32-bit words of eight codes along the row, the activations as 64-bit
words of four bf16 (unmasked where the chunk divides K, so the loads vectorize: 16 bytes a thread). The kernel is
bound by its ALU work, not by its loads (every launch configuration within 3%: BENCHMARKS.md), so the decode is
integer shifts and masks only (three instructions a code, two for the top one; the gated program's loop went from
2808 to 2296 SASS instructions with the arithmetic shift, `tools/compile_sm90.py --loops`): each code's bits placed
as a float32's, which reads exactly fp4(code) * 2^-126,
multiplied by x * 2^63 (an earlier float16 placement needed a float16 -> float32 conversion per code, a
quarter-rate instruction); each run of 4 words (32 inputs) shares one E8M0 scale, so products are summed per run
and scaled once, times 2^63.

One launch per GEMM, a program per (slot, BLOCK_N rows): gate/up (w1 and w3 with the SwiGLU, V4's clamp and,
with route_on_h, the routing weight; stored in h's dtype) and down (scaled by the routing weight unless it was
applied on h; float32 per slot). Slots whose expert is outside [first, first + n_local) write nothing."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _e2m1(u, c: tl.constexpr):
    """uint32 words of eight e2m1 codes -> float32 fp4(code c) * 2^-126, exactly, with no conversion instruction:
    the code (bits 4c .. 4c + 3) shifted to the top, an arithmetic shift right by 6 puts its sign at bit 31 (copied
    into bits 30-25) and its exponent and mantissa at bits 24-22 (a float32's exponent field 0-3 and top mantissa
    bit), and one mask clears the copies; code 1 (0.5) is the float32 subnormal 2^-127, which a GPU's fp32
    multiply keeps (no flush to zero outside libdevice)."""
    top = (u << (28 - 4 * c)) if c < 7 else u
    return ((top.to(tl.int32, bitcast=True) >> 6).to(tl.uint32, bitcast=True) & 0x81C00000).to(tl.float32,
                                                                                                 bitcast=True)


@triton.jit
def _e8m0(b):
    """int32 E8M0 bytes -> float32 2^(b - 127); byte 0 is 2^-127 (a float32 subnormal), 255 NaN."""
    bits = tl.where(b == 0, 0x400000, tl.where(b == 255, 0x7FC00000, b << 23))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _bf16_pair(v):
    """uint64 words of four bf16 -> the four as float32 (bf16 -> float32 is a 16-bit shift)."""
    return (((v << 16) & 0xFFFF0000).to(tl.uint32).to(tl.float32, bitcast=True),
            (v & 0xFFFF0000).to(tl.uint32).to(tl.float32, bitcast=True),
            ((v >> 16) & 0xFFFF0000).to(tl.uint32).to(tl.float32, bitcast=True),
            ((v >> 32) & 0xFFFF0000).to(tl.uint32).to(tl.float32, bitcast=True))


@triton.jit
def _x_chunk(x_row, w0, BLOCK_W: tl.constexpr, EVEN: tl.constexpr, X_BF16: tl.constexpr, words):
    """Inputs 8w + c of the chunk's words w = w0 .. w0 + BLOCK_W - 1, as eight (BLOCK_W,) float32 vectors times
    2^63 (so fp4 * 2^-126 * x * 2^63 stays a normal float). X_BF16: x read as 64-bit words of four bf16; else (the
    interpreter's float32 x) element by element."""
    X_SCALE: tl.constexpr = 2.0 ** 63
    w = w0 + tl.arange(0, BLOCK_W)
    ok = w < words
    if X_BF16:
        if EVEN:
            lo, hi = tl.load(x_row + 2 * w), tl.load(x_row + 2 * w + 1)
        else:
            lo, hi = tl.load(x_row + 2 * w, mask=ok, other=0), tl.load(x_row + 2 * w + 1, mask=ok, other=0)
        x0, x1, x2, x3 = _bf16_pair(lo.to(tl.uint64, bitcast=True))
        x4, x5, x6, x7 = _bf16_pair(hi.to(tl.uint64, bitcast=True))
    else:
        x0 = tl.load(x_row + 8 * w, mask=ok, other=0.0).to(tl.float32)
        x1 = tl.load(x_row + 8 * w + 1, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + 8 * w + 2, mask=ok, other=0.0).to(tl.float32)
        x3 = tl.load(x_row + 8 * w + 3, mask=ok, other=0.0).to(tl.float32)
        x4 = tl.load(x_row + 8 * w + 4, mask=ok, other=0.0).to(tl.float32)
        x5 = tl.load(x_row + 8 * w + 5, mask=ok, other=0.0).to(tl.float32)
        x6 = tl.load(x_row + 8 * w + 6, mask=ok, other=0.0).to(tl.float32)
        x7 = tl.load(x_row + 8 * w + 7, mask=ok, other=0.0).to(tl.float32)
    return (x0 * X_SCALE, x1 * X_SCALE, x2 * X_SCALE, x3 * X_SCALE, x4 * X_SCALE, x5 * X_SCALE, x6 * X_SCALE,
            x7 * X_SCALE)


@triton.jit
def _dot_words(acc, w_ptrs, s_ptrs, ok, g_ok, x0, x1, x2, x3, x4, x5, x6, x7, BLOCK_N: tl.constexpr,
               BLOCK_W: tl.constexpr, EVEN: tl.constexpr):
    """acc (BLOCK_N, BLOCK_W / 4) += each 32-input run's products (4 words) times its E8M0 scale."""
    if EVEN:
        u = tl.load(w_ptrs).to(tl.uint32, bitcast=True)
        sc = tl.load(s_ptrs).to(tl.int32)
    else:
        u = tl.load(w_ptrs, mask=ok, other=0).to(tl.uint32, bitcast=True)
        sc = tl.load(s_ptrs, mask=g_ok, other=127).to(tl.int32)
    p = (_e2m1(u, 0) * x0[None, :] + _e2m1(u, 1) * x1[None, :] + _e2m1(u, 2) * x2[None, :]
         + _e2m1(u, 3) * x3[None, :] + _e2m1(u, 4) * x4[None, :] + _e2m1(u, 5) * x5[None, :]
         + _e2m1(u, 6) * x6[None, :] + _e2m1(u, 7) * x7[None, :])
    return acc + tl.sum(tl.reshape(p, (BLOCK_N, BLOCK_W // 4, 4)), 2) * _e8m0(sc)


@triton.jit
def _fp4_gemv_kernel(
    x_ptr, w_ptr, w_s_ptr, w3_ptr, w3_s_ptr, out_ptr, idx_ptr, route_ptr,
    N, K, top_k, first, n_local,
    stride_x, stride_we, stride_wn, stride_se, stride_sn, stride_o,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, EVEN: tl.constexpr, X_BF16: tl.constexpr, GATED: tl.constexpr,
    MUL_ROUTE: tl.constexpr, SWIGLU_LIMIT: tl.constexpr,
):
    """out[slot, n] for BLOCK_N rows n of the slot's expert: w (E, N, K/8) int32 words of eight codes with (E, N,
    K/32) scale bytes (strides in words and bytes; x's in its own words: 64-bit with X_BF16, else elements).
    GATED: x row = slot // top_k, out = silu(min(g, L)) * clamp(u, -L, L) (no clamp at L = 0), g and u from w and
    w3; else x row = slot. MUL_ROUTE: times route[slot]. EVEN: K / 8 a multiple of BLOCK_W (no masks)."""
    ACC_SCALE: tl.constexpr = 2.0 ** 63
    slot = tl.program_id(0)
    expert = tl.load(idx_ptr + slot).to(tl.int32) - first
    if (expert < 0) | (expert >= n_local):
        return
    row = slot // top_k if GATED else slot
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    safe_n = (offs_n % N).to(tl.int64)
    offs_w = tl.arange(0, BLOCK_W)
    offs_g = tl.arange(0, BLOCK_W // 4)
    e = expert.to(tl.int64)
    w_off = e * stride_we + safe_n[:, None] * stride_wn + offs_w[None, :]
    s_off = e * stride_se + safe_n[:, None] * stride_sn + offs_g[None, :]
    x_row = x_ptr + row.to(tl.int64) * stride_x
    words = K // 8
    acc = tl.zeros((BLOCK_N, BLOCK_W // 4), tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_W // 4), tl.float32)
    for w0 in range(0, words, BLOCK_W):
        ok = (w0 + offs_w < words)[None, :]
        g_ok = (w0 // 4 + offs_g < words // 4)[None, :]
        x0, x1, x2, x3, x4, x5, x6, x7 = _x_chunk(x_row, w0, BLOCK_W, EVEN, X_BF16, words)
        acc = _dot_words(acc, w_ptr + w_off + w0, w_s_ptr + s_off + w0 // 4, ok, g_ok, x0, x1, x2, x3, x4, x5, x6,
                         x7, BLOCK_N, BLOCK_W, EVEN)
        if GATED:
            acc3 = _dot_words(acc3, w3_ptr + w_off + w0, w3_s_ptr + s_off + w0 // 4, ok, g_ok, x0, x1, x2, x3, x4,
                              x5, x6, x7, BLOCK_N, BLOCK_W, EVEN)
    y = tl.sum(acc, 1) * ACC_SCALE                                                  # 2^126 / X_SCALE
    if GATED:
        up = tl.sum(acc3, 1) * ACC_SCALE
        if SWIGLU_LIMIT > 0:
            y = tl.minimum(y, SWIGLU_LIMIT)
            up = tl.minimum(tl.maximum(up, -SWIGLU_LIMIT), SWIGLU_LIMIT)
        y = y / (1.0 + tl.exp(-y)) * up
    if MUL_ROUTE:
        y *= tl.load(route_ptr + slot)
    tl.store(out_ptr + slot.to(tl.int64) * stride_o + offs_n, y.to(out_ptr.dtype.element_ty), mask=offs_n < N)


def fp4_gemv_slots(a: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, w3: torch.Tensor | None,
                   w3_s: torch.Tensor | None, out: torch.Tensor, indices: torch.Tensor, route_w: torch.Tensor,
                   first: int, mul_route: bool, swiglu_limit: float = 0.0) -> None:
    """One GEMM of `fused_moe` at one token, per slot. a: (1, K) for gate/up (w3 given), (k, K) per slot for down;
    w, w3: (E, N, K/2) uint8, w_s, w3_s: (E, N, K/32) uint8; out: (k, N); indices: (1, k) global expert ids;
    route_w: (k,) float32. Shapes were checked by fused_moe (K a multiple of 32)."""
    gated = w3 is not None
    N, K = w.shape[1], 2 * w.shape[2]
    slots = indices.numel()
    block_n, block_b, warps = _gemv_config(N, K, slots, gated)
    block_w = min(block_b // 4, triton.next_power_of_2(K // 8))
    x_bf16 = a.dtype == torch.bfloat16 and a.stride(0) % 4 == 0 and a.data_ptr() % 8 == 0
    xw = a.view(torch.int64) if x_bf16 else a
    ww = w.view(torch.int32)
    _fp4_gemv_kernel[(slots, triton.cdiv(N, block_n))](
        xw, ww, w_s, w3.view(torch.int32) if gated else ww, w3_s if gated else w_s, out, indices, route_w,
        N, K, indices.shape[1], first, w.shape[0],
        xw.stride(0), ww.stride(0), ww.stride(1), w_s.stride(0), w_s.stride(1), out.stride(0),
        BLOCK_N=block_n, BLOCK_W=block_w, EVEN=(K // 8) % block_w == 0, X_BF16=x_bf16, GATED=gated,
        MUL_ROUTE=mul_route, SWIGLU_LIMIT=float(swiglu_limit) if gated else 0.0, num_warps=warps)


def _gemv_config(N: int, K: int, slots: int, gated: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_B, num_warps): at least two programs per SM (H100: 132); benchmarks/sweep_fp4_moe.py
    --gemv-configs measures the alternatives."""
    return (16 if triton.cdiv(N, 16) * slots >= 264 else 8), 512, 2
