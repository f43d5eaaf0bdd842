"""DeepSeek-V4's FP4 routed experts at one token (batch-1 decode): each of the token's k slots is a matrix-vector
product, run without tensor cores. `fused_moe` calls this for T = 1 in mode "fp4_weight_only"; its torch twin is
`fused_moe_torch`, as for the grouped GEMMs.

Why not the grouped GEMM: at one row the tensor-core dot decodes every weight to bf16 in the MMA layout and then
multiplies 15 rows of zeros; the decode is what limits it (112 us for V4-Flash's 6 experts of 4096 x 2048, 0.7
TB/s, against 61 us here: benchmarks/sweep_fp4_moe.py). Here a program holds BLOCK_N output rows and walks K
in steps of BLOCK_B packed bytes, loaded along the row (contiguous). The kernel is bound by its ALU work, not by
its loads (every launch configuration within 3%: BENCHMARKS.md), so the decode is integer masks and shifts only:
e2m1's bits placed as a float32's, which reads exactly fp4(code) * 2^-126, multiplied by x * 2^63 (an earlier
float16 placement needed a float16 -> float32 conversion per code, a quarter-rate instruction); each run of 16
bytes (32 inputs) shares one E8M0 scale, so products are summed per run and scaled once, times 2^63.

One launch per GEMM, a program per (slot, BLOCK_N rows): gate/up (w1 and w3 with the SwiGLU, V4's clamp and,
with route_on_h, the routing weight; stored in h's dtype) and down (scaled by the routing weight unless it was
applied on h; float32 per slot). Slots whose expert is outside [first, first + n_local) write nothing."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _e2m1_lo(u):
    """int32 bytes -> float32 fp4(low nibble) * 2^-126, exactly: e2m1's sign, exponent and mantissa bits placed as
    a float32's (exponent field 0-3, top mantissa bit), no conversion instruction; code 1 (0.5) is the float32
    subnormal 2^-127, which a GPU's fp32 multiply keeps (no flush to zero outside libdevice)."""
    return (((u & 7) << 22) | ((u & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _e2m1_hi(u):
    """int32 bytes -> float32 fp4(high nibble) * 2^-126, as _e2m1_lo."""
    return (((u & 0x70) << 18) | ((u & 0x80) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def _e8m0(b):
    """int32 E8M0 bytes -> float32 2^(b - 127); byte 0 is 2^-127 (a float32 subnormal), 255 NaN."""
    bits = tl.where(b == 0, 0x400000, tl.where(b == 255, 0x7FC00000, b << 23))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _fp4_gemv_kernel(
    x_ptr, w_ptr, w_s_ptr, w3_ptr, w3_s_ptr, out_ptr, idx_ptr, route_ptr,
    N, K, top_k, first, n_local,
    stride_x, stride_we, stride_wn, stride_se, stride_sn, stride_o,
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, GATED: tl.constexpr, MUL_ROUTE: tl.constexpr,
    SWIGLU_LIMIT: tl.constexpr,
):
    """out[slot, n] for BLOCK_N rows n of the slot's expert: w (E, N, K/2) packed bytes with (E, N, K/32) scales.
    GATED: x row = slot // top_k, out = silu(min(g, L)) * clamp(u, -L, L) (no clamp at L = 0), g and u from w and w3;
    else x row = slot. MUL_ROUTE: times route[slot]."""
    X_SCALE: tl.constexpr = 2.0 ** 63     # the products fp4 * 2^-126 * x * 2^63 stay normal floats
    ACC_SCALE: tl.constexpr = 2.0 ** 63
    slot = tl.program_id(0)
    expert = tl.load(idx_ptr + slot).to(tl.int32) - first
    if (expert < 0) | (expert >= n_local):
        return
    row = slot // top_k if GATED else slot
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    safe_n = (offs_n % N).to(tl.int64)
    offs_b = tl.arange(0, BLOCK_B)
    offs_g = tl.arange(0, BLOCK_B // 16)
    e = expert.to(tl.int64)
    w_off = e * stride_we + safe_n[:, None] * stride_wn + offs_b[None, :]
    s_off = e * stride_se + safe_n[:, None] * stride_sn + offs_g[None, :]
    x_row = x_ptr + row.to(tl.int64) * stride_x
    acc = tl.zeros((BLOCK_N,), tl.float32)
    acc3 = tl.zeros((BLOCK_N,), tl.float32)
    half = K // 2
    for i in range(0, half, BLOCK_B):
        b_ok = i + offs_b < half                                                    # K is a multiple of 32
        x_lo = tl.load(x_row + 2 * (i + offs_b), mask=b_ok, other=0.0).to(tl.float32) * X_SCALE
        x_hi = tl.load(x_row + 2 * (i + offs_b) + 1, mask=b_ok, other=0.0).to(tl.float32) * X_SCALE
        g_ok = (i // 16 + offs_g < half // 16)[None, :]
        u = tl.load(w_ptr + w_off + i, mask=b_ok[None, :], other=0).to(tl.int32)
        s = tl.load(w_s_ptr + s_off + i // 16, mask=g_ok, other=127).to(tl.int32)
        p = _e2m1_lo(u) * x_lo[None, :] + _e2m1_hi(u) * x_hi[None, :]
        acc += tl.sum(tl.sum(tl.reshape(p, (BLOCK_N, BLOCK_B // 16, 16)), 2) * _e8m0(s), 1)
        if GATED:
            u3 = tl.load(w3_ptr + w_off + i, mask=b_ok[None, :], other=0).to(tl.int32)
            s3 = tl.load(w3_s_ptr + s_off + i // 16, mask=g_ok, other=127).to(tl.int32)
            p3 = _e2m1_lo(u3) * x_lo[None, :] + _e2m1_hi(u3) * x_hi[None, :]
            acc3 += tl.sum(tl.sum(tl.reshape(p3, (BLOCK_N, BLOCK_B // 16, 16)), 2) * _e8m0(s3), 1)
    acc *= ACC_SCALE                                                                # 2^126 / X_SCALE
    if GATED:
        acc3 *= ACC_SCALE
        if SWIGLU_LIMIT > 0:
            acc = tl.minimum(acc, SWIGLU_LIMIT)
            acc3 = tl.minimum(tl.maximum(acc3, -SWIGLU_LIMIT), SWIGLU_LIMIT)
        acc = acc / (1.0 + tl.exp(-acc)) * acc3
    if MUL_ROUTE:
        acc *= tl.load(route_ptr + slot)
    tl.store(out_ptr + slot.to(tl.int64) * stride_o + offs_n, acc.to(out_ptr.dtype.element_ty), mask=offs_n < N)


def fp4_gemv_slots(a: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, w3: torch.Tensor | None,
                   w3_s: torch.Tensor | None, out: torch.Tensor, indices: torch.Tensor, route_w: torch.Tensor,
                   first: int, mul_route: bool, swiglu_limit: float = 0.0) -> None:
    """One GEMM of `fused_moe` at one token, per slot. a: (1, K) for gate/up (w3 given), (k, K) per slot for down;
    w, w3: (E, N, K/2) uint8, w_s, w3_s: (E, N, K/32) uint8; out: (k, N); indices: (1, k) global expert ids;
    route_w: (k,) float32. Shapes were checked by fused_moe."""
    gated = w3 is not None
    N, K = w.shape[1], 2 * w.shape[2]
    slots = indices.numel()
    block_n, block_b, warps = _gemv_config(N, K, slots, gated)
    grid = (slots, triton.cdiv(N, block_n))
    _fp4_gemv_kernel[grid](
        a, w, w_s, w3 if gated else w, w3_s if gated else w_s, out, indices, route_w,
        N, K, indices.shape[1], first, w.shape[0],
        a.stride(0), w.stride(0), w.stride(1), w_s.stride(0), w_s.stride(1), out.stride(0),
        BLOCK_N=block_n, BLOCK_B=min(block_b, triton.next_power_of_2(K // 2)), GATED=gated, MUL_ROUTE=mul_route,
        SWIGLU_LIMIT=float(swiglu_limit) if gated else 0.0, num_warps=warps)


def _gemv_config(N: int, K: int, slots: int, gated: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_B, num_warps): at least two programs per SM (H100: 132); benchmarks/sweep_fp4_moe.py
    --gemv-configs measures the alternatives."""
    return (16 if triton.cdiv(N, 16) * slots >= 264 else 8), 512, 2
