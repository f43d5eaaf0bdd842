"""Fused mixture-of-experts (Triton): the routed experts of one layer in two grouped GEMMs, without a host sync.

Design. A token's k routing choices are its k *slots* (slot = token * k + j). `align_slots` sorts the slots by
expert and pads each expert's run to a multiple of BLOCK_M, so every BLOCK_M-row tile of the sorted order belongs
to one expert; all of it is done with fixed-size tensor ops (no `.tolist()`, no data-dependent shapes), so a
decode step can be captured in a CUDA graph. Then:
  1. gate/up: h[slot] = silu(x[token] @ w1[e]^T) * (x[token] @ w3[e]^T), both projections in one kernel;
  2. down:    out[slot] = weight[slot] * (h[slot] @ w2[e]^T);
and y[token] = sum over its k slots. Tiles past an expert's last slot and tiles of padding experts (-1) exit at
once. With expert parallelism a rank holds experts [first, first + n_local); slots routed elsewhere are dropped.
The sum over a token's slots is taken in slot order (j = 0 .. k-1), so a token's result does not depend on which
tokens share its batch; `fused_moe_slots` leaves it to the shared experts' down projection (`fused_mlp(routed=)`),
which adds the slots in its epilogue and stores the layer's output in the activation dtype: no zero fill, no
separate sum and no cast launch.

Weights: the activation dtype, or FP8 e4m3 with 128x128 block scales, run either block-scaled (activations
quantized per token and 128 channels, FP8 tensor cores) or weight-only (bytes decoded to bf16 in registers, for
GPUs without FP8 tensor cores; half the speed of block-scaled on an H100 even at one token), or DeepSeek-V4's
FP4 e2m1 (two codes per byte, element 2k in the low nibble, one E8M0 scale byte per row and 32 inputs) decoded
to bf16 in registers ("fp4_weight_only": there are no FP4 tensor cores before Blackwell). A packed K step of
BLOCK_K/2 bytes becomes two bf16 tiles, the low and the high nibbles, which multiply the even and the odd input
columns of the activations: two dots of depth BLOCK_K/2 and no register shuffle to interleave the nibbles.

V4's experts also clamp before the SwiGLU (gate = min(gate, L), up = clamp(up, -L, L); `swiglu_limit`) and apply
the routing weight to h before the down projection (`route_on_h`). The latter is the same linear map; it differs
only in rounding, since h is stored in the activation dtype: bf16(h * w) (the reference) against bf16(h) * w.
At one token (batch-1 decode) tensor-core tiles are mostly padding: FP4 routed experts run as matrix-vector
products (fp4_gemv_triton.py) and a dense FP8 MLP (the shared experts) as fp8_gemv.py's, which quantizes the
activations itself and adds the routed slots in its epilogue.
Twin: `fused_moe_torch`, the per-expert loop.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .fp4 import fp4_dequant_torch
from .fp8 import act_quant_torch, weight_dequant_torch
from .fp8_gemv import fp8_gemv, gemv_fits
from .fp8_weight_only_triton import e4m3_to_bf16
from .triton_common import check_device, interpreting

MOE_MODES = ("plain", "weight_only", "block_scaled", "fp4_weight_only")
FP4_GROUP = 32                 # inputs per E8M0 scale of FP4 weights


def _aligned_size(num_slots: int, n_local: int, block_m: int) -> int:
    """Length of the padded slot list, a whole number of tiles: an expert with c > 0 slots takes ceil(c/block_m)
    <= floor(c/block_m) + 1 tiles, so all of them take at most num_slots // block_m + (experts with a slot) tiles,
    and at most min(num_slots, n_local) experts have one. (Sizing for every expert half a tile instead made 233
    of 241 tiles empty at one token over 256 experts.)"""
    return (num_slots // block_m + min(num_slots, n_local)) * block_m


@triton.jit
def _align_kernel(idx_ptr, slots_ptr, block_expert_ptr, num_slots, first, n_local, size,
                  BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr, FILL: tl.constexpr):
    """One program: count slots per local expert, lay the experts' runs out padded to BLOCK_M, write each slot
    at its expert's start plus the number of earlier slots of that expert, and name each tile's expert."""
    experts = tl.arange(0, E_PAD)
    counts = tl.zeros([E_PAD], tl.int32)
    for c in range(0, num_slots, CHUNK):
        offs = c + tl.arange(0, CHUNK)
        e = tl.load(idx_ptr + offs, mask=offs < num_slots, other=-1).to(tl.int32) - first
        e = tl.where((offs < num_slots) & (e >= 0) & (e < n_local), e, -1)
        counts += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    run = ends - padded                                   # where each expert's next slot goes
    for c in range(0, size, FILL):
        offs = c + tl.arange(0, FILL)
        tl.store(slots_ptr + offs, tl.zeros([FILL], tl.int32) + num_slots, mask=offs < size)
    tl.debug_barrier()                                    # the sentinel fill lands before the slots
    for c in range(0, num_slots, CHUNK):
        offs = c + tl.arange(0, CHUNK)
        e = tl.load(idx_ptr + offs, mask=offs < num_slots, other=-1).to(tl.int32) - first
        e = tl.where((offs < num_slots) & (e >= 0) & (e < n_local), e, -1)
        hit = (e[:, None] == experts[None, :]).to(tl.int32)                          # (CHUNK, E_PAD)
        dest = tl.sum(hit * (run[None, :] + tl.cumsum(hit, 0) - hit), 1)             # earlier hits move it on
        tl.store(slots_ptr + dest, offs, mask=e >= 0)
        run += tl.sum(hit, 0)
    for c in range(0, size // BLOCK_M, CHUNK):
        tiles = c + tl.arange(0, CHUNK)
        owner = tl.sum((ends[None, :] <= (tiles * BLOCK_M)[:, None]).to(tl.int32), 1)
        tl.store(block_expert_ptr + tiles, tl.where(owner < n_local, owner, -1), mask=tiles < size // BLOCK_M)


def align_slots(indices: torch.Tensor, first: int, n_local: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """indices: (T, k) int64 global expert ids -> sorted_slots (P,) int32 and block_expert (P / block_m,) int32.

    sorted_slots lists slot ids grouped by local expert, each group padded to a multiple of block_m with the
    sentinel T*k; block_expert[b] is the local expert of tile b, or -1 for tiles past the last group. P is
    `_aligned_size`, the most any routing can fill, so the shapes depend only on T. One launch."""
    indices = indices.contiguous()
    size = _aligned_size(indices.numel(), n_local, block_m)
    sorted_slots = torch.empty(size, dtype=torch.int32, device=indices.device)
    block_expert = torch.empty(size // block_m, dtype=torch.int32, device=indices.device)
    e_pad = triton.next_power_of_2(n_local)
    # chunks no longer than the slot list: at decode (a few slots) the (CHUNK, E_PAD) scans stay small
    chunk = max(16, min(1024, 8192 // e_pad, triton.next_power_of_2(indices.numel())))
    _align_kernel[(1,)](indices, sorted_slots, block_expert, indices.numel(), first, n_local, size,
                        BLOCK_M=block_m, E_PAD=e_pad, CHUNK=chunk, FILL=min(1024, triton.next_power_of_2(size)),
                        num_warps=8 if chunk * e_pad >= 4096 else 4)
    return sorted_slots, block_expert


def align_slots_torch(indices: torch.Tensor, first: int, n_local: int,
                      block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of `align_slots` in tensor ops (a stable sort by expert)."""
    num_slots = indices.numel()
    device = indices.device
    e = indices.flatten() - first
    e = torch.where((e >= 0) & (e < n_local), e, n_local)                      # n_local: not on this rank
    counts = torch.zeros(n_local + 1, dtype=torch.int64, device=device).scatter_add_(0, e, torch.ones_like(e))
    padded = (counts[:n_local] + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    count_start = counts.cumsum(0) - counts                                    # first sorted position per expert
    order = e.argsort(stable=True)                                             # slots grouped by expert
    sorted_e = e[order]
    rank = torch.arange(num_slots, device=device) - count_start[sorted_e]      # position within its expert
    padded_start = torch.cat([padded_end.new_zeros(1), padded_end])[sorted_e]   # (trash group starts at the end)
    size = _aligned_size(num_slots, n_local, block_m)
    dest = torch.where(sorted_e < n_local, padded_start + rank, size)          # trash slots go to a spill row
    sorted_slots = torch.full((size + 1,), num_slots, dtype=torch.int32, device=device)
    sorted_slots.scatter_(0, dest, order.to(torch.int32))
    tile_start = torch.arange(0, size, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, tile_start, right=True)
    block_expert = torch.where(block_expert < n_local, block_expert, -1).to(torch.int32)
    return sorted_slots[:size], block_expert


@triton.jit
def e2m1_to_float(code, scale):
    """Decode FP4 e2m1 codes (integers 0..15: bit 3 the sign, bits 0-2 index 0, .5, 1, 1.5, 2, 3, 4, 6) times
    their E8M0 scale bytes (2^(b - 127); 255 is NaN) to float32, exactly. A magnitude m >= 2 is exponent m >> 1
    and mantissa bit m & 1, i.e. float32 bits (m << 22) + (126 << 23); m = 1 is 0.5 (126 << 23). The product of
    two powers of two times at most two significant bits is exact (and so is its later cast to bf16)."""
    c = code.to(tl.int32)
    m = c & 7
    bits = tl.where(m >= 2, (m << 22) + (126 << 23), tl.where(m == 1, 126 << 23, 0)) | ((c & 8) << 28)
    b = scale.to(tl.int32)
    s_bits = tl.where(b == 0, 0x400000, tl.where(b == 255, 0x7FC00000, b << 23))
    return bits.to(tl.float32, bitcast=True) * s_bits.to(tl.float32, bitcast=True)


@triton.jit
def _fp4_dot(a_lo, a_hi, u, s, DOT_FP32: tl.constexpr):
    """a_lo, a_hi: (BLOCK_M, BLOCK_K/2) the even and odd input columns; u: (BLOCK_K/2, BLOCK_N) packed bytes
    (w^T), s: their scale bytes -> a @ w^T over the BLOCK_K inputs, float32 (BLOCK_M, BLOCK_N)."""
    w_lo = e2m1_to_float(u & 0xF, s)
    w_hi = e2m1_to_float(u >> 4, s)
    if DOT_FP32:   # Triton 3.6's interpreter mishandles low-precision dots: give it exact float32
        acc = (tl.dot(a_lo.to(tl.float32), w_lo, input_precision="ieee")
               + tl.dot(a_hi.to(tl.float32), w_hi, input_precision="ieee"))
    else:          # (an early return would still compile this branch, which float32 a cannot take)
        acc = tl.dot(a_lo, w_lo.to(tl.bfloat16)) + tl.dot(a_hi, w_hi.to(tl.bfloat16))
    return acc


@triton.jit
def _moe_gemm_kernel(
    a_ptr, a_s_ptr, w_ptr, w_s_ptr, w3_ptr, w3_s_ptr, out_ptr, slots_ptr, block_expert_ptr, route_w_ptr,   # pointers
    slot_out_ptr, idx_ptr,
    N, K, num_slots, top_k, slot_k, first, n_local,                                                       # sizes
    stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn, stride_om, stride_so,            # strides
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GATED: tl.constexpr, A_PER_TOKEN: tl.constexpr, MUL_ROUTE: tl.constexpr, MODE: tl.constexpr,
    DENSE: tl.constexpr, PER_SLOT: tl.constexpr, ACCUMULATE: tl.constexpr, SUM_SLOTS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    SWIGLU_LIMIT: tl.constexpr, SCALED_DOT: tl.constexpr = False,
):
    """One (tile of sorted slots, BLOCK_N output columns). MODE 0: plain, 1: FP8 weight-only, 2: FP8 block-scaled,
    3: FP4 weight-only (w: (E, N, K/2) bytes, w_s: (E, N, K/32) E8M0 bytes; K is the unpacked depth).
    GATED: out = silu(a @ w^T) * (a @ w3^T), with gate clamped above and up to +-SWIGLU_LIMIT when it is > 0.
    A_PER_TOKEN: row of a = slot // top_k (else slot).
    MUL_ROUTE: out *= route_w[slot]. DENSE: one expert for every row (slot = token; a plain MLP).
    PER_SLOT: no aligned slot list: tile j is slot j alone, its expert idx[j] - first (skipped if not local).
    ACCUMULATE: out += the result instead of out = it. SUM_SLOTS (DENSE): the result plus, first, the routed
    slots t * slot_k + j of each token t (rows of slot_out), summed in order j = 0 .. slot_k - 1, skipping slots
    whose expert (idx) is outside [first, first + n_local)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if DENSE:
        expert = 0
        slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    elif PER_SLOT:
        expert = tl.load(idx_ptr + pid_m).to(tl.int32) - first
        if (expert < 0) | (expert >= n_local):
            return
        slots = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_slots)
    else:
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:
            return
        slots = tl.load(slots_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = slots < num_slots
    rows = tl.where(valid, slots // top_k if A_PER_TOKEN else slots, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    safe_n = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    e = expert.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if MODE == 3:                 # FP4: byte b of a row holds inputs 2b (low nibble) and 2b + 1 (high nibble)
        offs_b = tl.arange(0, BLOCK_K // 2)
        a_ptrs = a_ptr + rows[:, None] * stride_am + 2 * offs_b[None, :]                # even inputs; +1: odd
        w_off = e * stride_we + safe_n[None, :] * stride_wn + offs_b[:, None]           # (BLOCK_K/2, BLOCK_N)
        s_off = e * stride_wse + safe_n[None, :] * stride_wsn + (offs_b // 16)[:, None]    # 16 bytes a scale
        if SCALED_DOT:            # Triton's microscaling dot: e2m1 upcast in registers, bf16 tensor cores
            offs_g = tl.arange(0, BLOCK_K // 32)
            ak_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]
            sg_off = e * stride_wse + safe_n[:, None] * stride_wsn + offs_g[None, :]         # (BLOCK_N, BLOCK_K/32)
            for i in range(tl.cdiv(K, BLOCK_K)):
                b_mask = offs_b < (K - i * BLOCK_K) // 2
                a = tl.load(ak_ptrs, mask=valid[:, None] & (offs_k < K - i * BLOCK_K)[None, :], other=0.0)
                g_mask = (offs_g < (K - i * BLOCK_K) // 32)[None, :]
                u = tl.load(w_ptr + w_off, mask=b_mask[:, None], other=0)
                s = tl.load(w_s_ptr + sg_off, mask=g_mask, other=127)
                acc = tl.dot_scaled(a, None, "bf16", u, s, "e2m1", acc=acc)
                if GATED:
                    u3 = tl.load(w3_ptr + w_off, mask=b_mask[:, None], other=0)
                    s3 = tl.load(w3_s_ptr + sg_off, mask=g_mask, other=127)
                    acc3 = tl.dot_scaled(a, None, "bf16", u3, s3, "e2m1", acc=acc3)
                ak_ptrs += BLOCK_K
                w_off += BLOCK_K // 2
                sg_off += BLOCK_K // 32
        else:
            for i in range(tl.cdiv(K, BLOCK_K)):
                b_mask = offs_b < (K - i * BLOCK_K) // 2                                # K is even
                a_mask = valid[:, None] & b_mask[None, :]
                a_lo = tl.load(a_ptrs, mask=a_mask, other=0.0)
                a_hi = tl.load(a_ptrs + 1, mask=a_mask, other=0.0)
                u = tl.load(w_ptr + w_off, mask=b_mask[:, None], other=0)
                s = tl.load(w_s_ptr + s_off, mask=b_mask[:, None], other=127)
                acc += _fp4_dot(a_lo, a_hi, u, s, DOT_FP32)
                if GATED:
                    u3 = tl.load(w3_ptr + w_off, mask=b_mask[:, None], other=0)
                    s3 = tl.load(w3_s_ptr + s_off, mask=b_mask[:, None], other=127)
                    acc3 += _fp4_dot(a_lo, a_hi, u3, s3, DOT_FP32)
                a_ptrs += BLOCK_K
                w_off += BLOCK_K // 2
                s_off += BLOCK_K // 32
    else:
        a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]                    # (BLOCK_M, BLOCK_K)
        w_ptrs = w_ptr + e * stride_we + safe_n[None, :] * stride_wn + offs_k[:, None]  # (BLOCK_K, BLOCK_N) = w^T
        w3_ptrs = w3_ptr + e * stride_we + safe_n[None, :] * stride_wn + offs_k[:, None]
        w_s_ptrs = w_s_ptr + e * stride_wse + (safe_n // 128) * stride_wsn
        w3_s_ptrs = w3_s_ptr + e * stride_wse + (safe_n // 128) * stride_wsn
        a_s_ptrs = a_s_ptr + rows * stride_asm

        for i in range(tl.cdiv(K, BLOCK_K)):
            k_mask = offs_k < K - i * BLOCK_K
            a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
            if GATED:
                w3 = tl.load(w3_ptrs, mask=k_mask[:, None], other=0.0)
            if MODE == 1:                               # FP8 weight-only: decode bytes to bf16, scale per K step
                w = e4m3_to_bf16(w)
                if GATED:
                    w3 = e4m3_to_bf16(w3)
            if DOT_FP32:   # Triton 3.6's interpreter mishandles low-precision dots: give it exact float32
                part = tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
                if GATED:
                    part3 = tl.dot(a.to(tl.float32), w3.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(a, w)
                if GATED:
                    part3 = tl.dot(a, w3)
            if MODE == 0:
                acc += part
                if GATED:
                    acc3 += part3
            else:
                scale = tl.load(w_s_ptrs + i * BLOCK_K // 128)[None, :]
                if MODE == 2:
                    scale = scale * tl.load(a_s_ptrs + i * BLOCK_K // 128, mask=valid, other=0.0)[:, None]
                acc += part * scale
                if GATED:
                    scale3 = tl.load(w3_s_ptrs + i * BLOCK_K // 128)[None, :]
                    if MODE == 2:
                        scale3 = scale3 * tl.load(a_s_ptrs + i * BLOCK_K // 128, mask=valid, other=0.0)[:, None]
                    acc3 += part3 * scale3
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
            w3_ptrs += BLOCK_K

    if GATED:
        if SWIGLU_LIMIT > 0:                                                        # DeepSeek-V4's clamp
            acc = tl.minimum(acc, SWIGLU_LIMIT)
            acc3 = tl.minimum(tl.maximum(acc3, -SWIGLU_LIMIT), SWIGLU_LIMIT)
        acc = acc / (1.0 + tl.exp(-acc)) * acc3                                      # silu(gate) * up
    if MUL_ROUTE:
        acc *= tl.load(route_w_ptr + slots, mask=valid, other=0.0)[:, None]
    out_ptrs = out_ptr + slots[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    out_mask = valid[:, None] & (offs_n[None, :] < N)
    if SUM_SLOTS:
        routed = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for j in range(slot_k):
            slot = slots.to(tl.int64) * slot_k + j
            local = tl.load(idx_ptr + slot, mask=valid, other=-1) - first
            local = valid & (local >= 0) & (local < n_local)
            routed += tl.load(slot_out_ptr + slot[:, None] * stride_so + offs_n[None, :],
                              mask=local[:, None] & (offs_n[None, :] < N), other=0.0)
        acc = routed + acc
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _block_m(num_slots: int, n_local: int) -> int:
    """Rows per tile (and the padding unit of each expert's run) for this many slots per expert."""
    if interpreting():
        return 16
    per_expert = num_slots / max(n_local, 1)
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


def _launch_config(block_m: int, active_tiles: int, N: int, mode: str,
                   elem_bytes: int = 2) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages). Small batches read weights: narrower column tiles until about
    two programs run per SM (H100: 132), so every SM streams; but with FP8 or bf16 weights at 16-row tiles not
    below 32 columns, where each K step's loads get too small to keep the memory system busy (fewer, wider
    programs measured faster: benchmarks/sweep_small_m.py --moe, --moe-bf16), and bf16/fp16 16-row tiles with
    fewer programs than SMs (a dense MLP at one token) take 256-deep K steps (V2-Lite's shared experts at one
    token: 18.1 us with either GEMM so, 19.5 us in 16 x 128 tiles; float32 tiles that deep overflow shared
    memory). 16-wide tiles run on 2 warps. Large batches compute: 128-wide tiles."""
    if interpreting():
        return 32, {"plain": 32, "fp4_weight_only": 64}.get(mode, 128), 4, 1
    if block_m >= 64:
        return 128, 128 if mode != "plain" else 64, 4, 3
    floor = 32 if block_m == 16 and mode in ("plain", "weight_only", "block_scaled") else 16
    block_n = 64
    while block_n > floor and active_tiles * triton.cdiv(N, block_n) < 264:
        block_n //= 2
    deep = mode == "plain" and elem_bytes == 2 and block_m == 16 and active_tiles * triton.cdiv(N, block_n) < 132
    return block_n, 256 if deep else 128, 2 if block_n == 16 else 4, 4


def _gemm(a, a_s, w, w_s, w3, w3_s, out, sorted_slots, block_expert, route_w, top_k, mode, gated, block_m,
          active_tiles, dense=False, accumulate=False, swiglu_limit=0.0, route_on_h=False,
          routed: RoutedSlots | None = None, per_slot: tuple[torch.Tensor, int, int] | None = None) -> None:
    """Launch one GEMM: gate/up (gated, rows of `a` per token) or down (rows per slot, scattered into the tokens'
    rows); the routing weight multiplies the down projection's output, or h in gate/up with `route_on_h`;
    `dense` runs every row through expert 0 (a plain MLP), adding the `routed` slots of each token if given.
    per_slot = (indices, first, n_local): one tile per slot, no aligned list (`_routed` at one token)."""
    N, K = w.shape[1], w.shape[2] * (2 if mode == "fp4_weight_only" else 1)
    block_n, block_k, warps, stages = _launch_config(block_m, active_tiles, N, mode, a.element_size())
    if mode in ("weight_only", "fp4_weight_only"):     # the kernel decodes e4m3 / e2m1 and E8M0 from raw bytes
        w, w3 = w.view(torch.uint8), w3.view(torch.uint8)
    if mode == "fp4_weight_only":
        w_s, w3_s = w_s.view(torch.uint8), w3_s.view(torch.uint8)
    rows = a.shape[0] if dense else route_w.numel()
    tiles = triton.cdiv(rows, block_m) if dense else rows if per_slot is not None else block_expert.numel()
    grid = (tiles, triton.cdiv(N, block_n))
    dummy = out                                   # any tensor: pointers the constexpr flags never read
    idx, first, n_local = per_slot if per_slot is not None else (
        (routed.indices, routed.first, routed.n_local) if routed is not None else (dummy, 0, 0))
    _moe_gemm_kernel[grid](
        a, dummy if a_s is None else a_s, w, dummy if w_s is None else w_s, w3, dummy if w3_s is None else w3_s,
        out, dummy if sorted_slots is None else sorted_slots, dummy if block_expert is None else block_expert,
        dummy if route_w is None else route_w,
        dummy if routed is None else routed.out, idx,
        N, K, rows, top_k, 0 if routed is None else routed.indices.shape[1], first, n_local,
        a.stride(0), 0 if a_s is None else a_s.stride(0), w.stride(0), w.stride(1),
        0 if w_s is None else w_s.stride(0), 0 if w_s is None else w_s.stride(1), out.stride(0),
        0 if routed is None else routed.out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GATED=gated, A_PER_TOKEN=gated,
        MUL_ROUTE=not dense and gated == route_on_h, MODE=MOE_MODES.index(mode), DENSE=dense,
        PER_SLOT=per_slot is not None, ACCUMULATE=accumulate, SUM_SLOTS=routed is not None,
        DOT_FP32=interpreting() or a.dtype == torch.float32, SWIGLU_LIMIT=float(swiglu_limit) if gated else 0.0,
        SCALED_DOT=_scaled_dot(mode, a), num_warps=warps, num_stages=stages)


def _scaled_dot(mode: str, a: torch.Tensor) -> bool:
    """FP4 weights through Triton's microscaling dot (its e2m1 upcast: 2x faster than our bit decode, measured in
    benchmarks/sweep_fp4_moe.py); the interpreter has no dot_scaled, and it takes bf16 activations."""
    return mode == "fp4_weight_only" and a.dtype == torch.bfloat16 and not interpreting()


def _fp4_gemv(T: int, mode: str) -> bool:
    return T == 1 and mode == "fp4_weight_only"


def _fp8_gemv(x: torch.Tensor, mode: str, w: torch.Tensor) -> bool:
    """A dense FP8 MLP at one token: matrix-vector products (fp8_gemv.py: bf16 x, rows of 4-byte words, not the
    largest matrices; w1 and w2 have as many weights, so gate/up and down decide alike), the activations quantized
    inside. x: the GEMM's input as `_activations` would give it to the GEMM (bf16 but in
    weight-only mode under the interpreter)."""
    return (x.shape[0] == 1 and mode in ("block_scaled", "weight_only") and gemv_fits(w) and w.shape[-2] % 4 == 0
            and (mode == "block_scaled" or x.dtype == torch.bfloat16 or not interpreting()))


def _check_args(mode: str, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                scales: tuple[torch.Tensor | None, ...], swiglu_limit: float) -> None:
    """ValueError/TypeError for a mode, weights and scales that do not go together (shapes as in `fused_moe`)."""
    if mode not in MOE_MODES:
        raise ValueError(f"unknown fused MoE mode {mode!r}; choose one of {', '.join(MOE_MODES)}")
    if swiglu_limit < 0:
        raise ValueError(f"swiglu_limit must be >= 0 (0: no clamp), got {swiglu_limit}")
    check_device(x=x, w1=w1, w2=w2, w3=w3)
    if mode != "fp4_weight_only":
        return
    E, inter, half = w1.shape
    D = x.shape[1]
    want = {"w1": (E, inter, D // 2), "w3": (E, inter, D // 2), "w2": (E, D, inter // 2),
            "w1_s": (E, inter, D // FP4_GROUP), "w3_s": (E, inter, D // FP4_GROUP),
            "w2_s": (E, D, inter // FP4_GROUP)}
    got = {"w1": w1, "w3": w3, "w2": w2, "w1_s": scales[0], "w2_s": scales[1], "w3_s": scales[2]}
    if D % FP4_GROUP or inter % FP4_GROUP:
        raise ValueError(f"FP4 experts need the hidden size ({D}) and expert width ({inter}) to be multiples of "
                         f"{FP4_GROUP}")
    for name, t in got.items():
        if t is None:
            raise ValueError(f"mode 'fp4_weight_only' needs the E8M0 scales {name}")
        dtypes = (torch.uint8, torch.float8_e8m0fnu) if name.endswith("_s") else (torch.uint8, torch.int8)
        if t.dtype not in dtypes:
            raise TypeError(f"FP4 {name} must be {' or '.join(str(d).removeprefix('torch.') for d in dtypes)}, "
                            f"got {str(t.dtype).removeprefix('torch.')}")
        if tuple(t.shape) != want[name] or not t.is_contiguous():
            raise ValueError(f"FP4 {name} must be a contiguous {want[name]} tensor for x of width {D} and "
                             f"experts of width {inter}; got {tuple(t.shape)}")


def _activations(x: torch.Tensor, mode: str, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first GEMM's input: FP8 + per-token scales (block_scaled), bf16 where the kernel decodes weights to
    bf16 (weight-only modes on GPU), else x."""
    x = x.contiguous()
    if mode == "block_scaled":
        return _act_quant(x, scale_fmt)
    if mode in ("weight_only", "fp4_weight_only") and x.dtype != torch.bfloat16 and not interpreting():
        x = x.to(torch.bfloat16)
    return x, None


class RoutedSlots(NamedTuple):
    """The routed experts' outputs per slot, not yet summed (`fused_moe_slots`): out (T * k, D) float32, row
    t * k + j the weighted output of token t's j-th choice; indices (T, k) int64 the global expert ids. Rows of
    slots whose expert is outside [first, first + n_local) (another rank's) are not written: whoever sums the
    slots (`fused_mlp(routed=)`) skips them."""
    out: torch.Tensor
    indices: torch.Tensor
    first: int
    n_local: int


def fused_moe(x: torch.Tensor, route_w: torch.Tensor, indices: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
              w3: torch.Tensor, w1_s: torch.Tensor | None = None, w2_s: torch.Tensor | None = None,
              w3_s: torch.Tensor | None = None, first: int = 0, mode: str = "plain", swiglu_limit: float = 0.0,
              route_on_h: bool = False, scale_fmt: str | None = None) -> torch.Tensor:
    """Routed experts of one layer. x: (T, D) bf16/fp16/fp32; route_w: (T, k) float32; indices: (T, k) int64
    global expert ids; first: global id of local expert 0. Weights by mode:
    - "plain": w1, w3: (E_local, I, D), w2: (E_local, D, I) in x's dtype;
    - "weight_only" / "block_scaled": the same shapes in FP8 e4m3 with scales w*_s:
      (E_local, ceil(rows/128), ceil(cols/128)) float32;
    - "fp4_weight_only": w1, w3: (E_local, I, D/2), w2: (E_local, D, I/2) uint8/int8 packed e2m1 with scales
      w*_s: (E_local, rows, cols/32) E8M0 bytes (uint8 or float8_e8m0fnu).
    swiglu_limit > 0: gate = min(gate, L), up = clamp(up, -L, L) before silu(gate) * up (DeepSeek-V4).
    route_on_h: multiply h by the routing weight before the down projection (V4's rounding) instead of after.
    scale_fmt: how "block_scaled" quantizes the activations (None or "ue8m0": power-of-two scales, V3.1 and V4).
    Returns (T, D) float32."""
    T, D = x.shape
    out = torch.zeros(T * indices.shape[1], D, dtype=torch.float32, device=x.device)   # other ranks' slots stay 0
    _routed(x, route_w, indices, w1, w2, w3, w1_s, w2_s, w3_s, first, mode, swiglu_limit, route_on_h, out, scale_fmt)
    return out.view(T, -1, D).sum(dim=1)          # in slot order: a token's sum does not depend on its batch


def fused_moe_slots(x: torch.Tensor, route_w: torch.Tensor, indices: torch.Tensor, w1: torch.Tensor,
                    w2: torch.Tensor, w3: torch.Tensor, w1_s: torch.Tensor | None = None,
                    w2_s: torch.Tensor | None = None, w3_s: torch.Tensor | None = None, first: int = 0,
                    mode: str = "plain", swiglu_limit: float = 0.0, route_on_h: bool = False,
                    scale_fmt: str | None = None) -> RoutedSlots:
    """`fused_moe` without the sum: the (T * k, D) float32 outputs per slot, for `fused_mlp(routed=)` to add."""
    indices = indices.contiguous()
    out = torch.empty(indices.numel(), x.shape[1], dtype=torch.float32, device=x.device)
    _routed(x, route_w, indices, w1, w2, w3, w1_s, w2_s, w3_s, first, mode, swiglu_limit, route_on_h, out, scale_fmt)
    return RoutedSlots(out, indices, first, w1.shape[0])


def _routed(x, route_w, indices, w1, w2, w3, w1_s, w2_s, w3_s, first, mode, swiglu_limit, route_on_h,
            out, scale_fmt=None) -> None:
    """The two grouped GEMMs, writing each local slot's weighted output into its row of out (T * k, D). One token
    (batch-1 decode) skips the alignment: its k slots are k distinct experts, so each slot is a tile by itself
    (were two the same, that expert's weights would be read twice, the result unchanged): k tiles, as many as
    the aligned list has at one token when k < block_m and every expert is local (see _aligned_size)."""
    _check_args(mode, x, w1, w2, w3, (w1_s, w2_s, w3_s), swiglu_limit)
    T = x.shape[0]
    n_local, inter = w1.shape[0], w1.shape[1]
    top_k = indices.shape[1]
    block_m = _block_m(indices.numel(), n_local)
    per_slot = None
    if T == 1:
        sorted_slots = block_expert = None
        per_slot = (indices.contiguous(), first, n_local)
        active = top_k
    else:
        sorted_slots, block_expert = align_slots(indices, first, n_local, block_m)
        active = block_expert.numel()                                      # tiles (see _aligned_size)
    route_w = route_w.float().contiguous().flatten()
    x, a_s = _activations(x, mode, scale_fmt)
    h_dtype = x.dtype if mode != "block_scaled" else torch.bfloat16
    h = torch.empty(T * top_k, inter, dtype=h_dtype, device=x.device)
    if _fp4_gemv(T, mode):                          # matrix-vector products, no tensor cores (fp4_gemv_triton.py)
        from .fp4_gemv_triton import fp4_gemv_slots
        w1, w2, w3, w1_s, w2_s, w3_s = (t.view(torch.uint8) for t in (w1, w2, w3, w1_s, w2_s, w3_s))
        idx = per_slot[0]
        fp4_gemv_slots(x, w1, w1_s, w3, w3_s, h, idx, route_w, first, route_on_h, swiglu_limit)
        fp4_gemv_slots(h, w2, w2_s, None, None, out, idx, route_w, first, not route_on_h)
        return
    _gemm(x, a_s, w1, w1_s, w3, w3_s, h, sorted_slots, block_expert, route_w, top_k, mode, True, block_m, active,
          swiglu_limit=swiglu_limit, route_on_h=route_on_h, per_slot=per_slot)
    h_s = None
    if mode == "block_scaled":
        h, h_s = _act_quant(h, scale_fmt)
    _gemm(h, h_s, w2, w2_s, w2, w2_s, out, sorted_slots, block_expert, route_w, top_k, mode, False, block_m,
          active, route_on_h=route_on_h, per_slot=per_slot)


def fused_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, w1_s: torch.Tensor | None = None,
              w2_s: torch.Tensor | None = None, w3_s: torch.Tensor | None = None, mode: str = "plain",
              out: torch.Tensor | None = None, swiglu_limit: float = 0.0, routed: RoutedSlots | None = None,
              out_dtype: torch.dtype = torch.float32, scale_fmt: str | None = None) -> torch.Tensor:
    """A dense SwiGLU MLP (the shared experts) through the same two kernels, every token on one "expert".
    x: (T, D); w1, w3: (I, D), w2: (D, I), FP8 with (ceil(rows/128), ceil(cols/128)) scales in the FP8 modes,
    packed FP4 ((I, D/2), (D, I/2)) with (rows, cols/32) E8M0 scales in "fp4_weight_only".
    Returns (T, D) in out_dtype (float32 by default); with `out` ((T, D) float32, e.g. the routed experts' sum)
    the result is added into it in the down projection's epilogue, and `out` is returned. With `routed` (from
    `fused_moe_slots` for these T tokens) the epilogue adds each token's routed slots, summed in slot order, to
    the result: the MoE layer's output in one store. swiglu_limit and scale_fmt as in `fused_moe`.
    The two GEMMs are also callable apart (`fused_mlp_up`, then `fused_mlp_down`), so that other work can run
    between or beside them."""
    hidden = fused_mlp_up(x, w1, w2, w3, w1_s, w2_s, w3_s, mode, swiglu_limit, scale_fmt)
    return fused_mlp_down(hidden, w2, w2_s, out, routed, out_dtype)


class MlpHidden(NamedTuple):
    """A dense MLP between its GEMMs: h (T, I) = silu(x w1^T) * (x w3^T) in x's dtype (bf16 in "block_scaled",
    there FP8-quantized with its per-128 scales h_s), and the mode it was computed in."""
    h: torch.Tensor
    h_s: torch.Tensor | None
    mode: str
    scale_fmt: str | None = None         # how the down projection quantizes h where h_s is None (one token)


def fused_mlp_up(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                 w1_s: torch.Tensor | None = None, w2_s: torch.Tensor | None = None,
                 w3_s: torch.Tensor | None = None, mode: str = "plain", swiglu_limit: float = 0.0,
                 scale_fmt: str | None = None) -> MlpHidden:
    """`fused_mlp`'s gate/up GEMM with the SwiGLU (all three weights are checked here, as by `fused_mlp`)."""
    w1, w2, w3 = w1.unsqueeze(0), w2.unsqueeze(0), w3.unsqueeze(0)
    w1_s, w2_s, w3_s = (None if s is None else s.unsqueeze(0) for s in (w1_s, w2_s, w3_s))
    _check_args(mode, x, w1, w2, w3, (w1_s, w2_s, w3_s), swiglu_limit)
    T = x.shape[0]
    if _fp8_gemv(x, mode, w1):
        scaled = mode == "block_scaled"
        h = fp8_gemv(x.to(torch.bfloat16).contiguous(), w1[0], w1_s[0], w3[0], w3_s[0], quantize=scaled,
                     scale_fmt=scale_fmt if scaled else None, swiglu_limit=swiglu_limit)   # x as _act_quant has it
        return MlpHidden(h, None, mode, scale_fmt)
    block_m = _block_m(T, 1)
    x, a_s = _activations(x, mode, scale_fmt)
    h = torch.empty(T, w1.shape[1], dtype=x.dtype if mode != "block_scaled" else torch.bfloat16, device=x.device)
    _gemm(x, a_s, w1, w1_s, w3, w3_s, h, None, None, None, 1, mode, True, block_m, triton.cdiv(T, block_m),
          dense=True, swiglu_limit=swiglu_limit)
    h_s = None
    if mode == "block_scaled":
        h, h_s = _act_quant(h, scale_fmt)
    return MlpHidden(h, h_s, mode, scale_fmt)


def fused_mlp_down(hidden: MlpHidden, w2: torch.Tensor, w2_s: torch.Tensor | None = None,
                   out: torch.Tensor | None = None, routed: RoutedSlots | None = None,
                   out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`fused_mlp`'s down GEMM on `fused_mlp_up`'s output, with the same w2 (and scales): out, routed and
    out_dtype as in `fused_mlp`."""
    h, h_s, mode, scale_fmt = hidden
    w2 = w2.unsqueeze(0)
    w2_s = None if w2_s is None else w2_s.unsqueeze(0)
    T, D = h.shape[0], w2.shape[1]
    if routed is not None and (routed.out.shape != (routed.indices.numel(), D) or routed.indices.shape[0] != T
                               or routed.out.dtype != torch.float32):
        raise ValueError(f"routed slots {tuple(routed.out.shape)} {routed.out.dtype} of indices "
                         f"{tuple(routed.indices.shape)} do not belong to {T} tokens of width {D}")
    if h_s is None and h.dtype == torch.bfloat16 and _fp8_gemv(h, mode, w2):   # one token, routed slots added
        slots = None if routed is None else (routed.out, routed.indices.view(-1), routed.first, routed.n_local)
        scaled = mode == "block_scaled"
        return fp8_gemv(h, w2[0], w2_s[0], out=out, quantize=scaled, scale_fmt=scale_fmt if scaled else None,
                        dtype=out_dtype, routed=slots)
    block_m = _block_m(T, 1)
    accumulate = out is not None
    if out is None:
        out = torch.empty(T, D, dtype=out_dtype, device=h.device)
    _gemm(h, h_s, w2, w2_s, w2, w2_s, out, None, None, None, 1, mode, False, block_m, triton.cdiv(T, block_m),
          dense=True, accumulate=accumulate, routed=routed)
    return out


def _act_quant(x: torch.Tensor, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from .fp8_quant_triton import act_quant
    return act_quant(x.to(torch.bfloat16).contiguous(), 128, scale_fmt)


def fused_moe_torch(x: torch.Tensor, route_w: torch.Tensor, indices: torch.Tensor, w1: torch.Tensor,
                    w2: torch.Tensor, w3: torch.Tensor, w1_s: torch.Tensor | None = None,
                    w2_s: torch.Tensor | None = None, w3_s: torch.Tensor | None = None, first: int = 0,
                    mode: str = "plain", swiglu_limit: float = 0.0, route_on_h: bool = False,
                    scale_fmt: str | None = None) -> torch.Tensor:
    """Twin of `fused_moe`: a loop over the local experts, weights dequantized (FP4 through `fp4_dequant_torch`).
    "block_scaled" also quantizes the activations (per token and 128 channels) as the kernel does; "plain" and
    "fp4_weight_only" round h to x's dtype as the kernel stores it. Returns (T, D) float32."""
    T, D = x.shape
    y = torch.zeros(T, D, dtype=torch.float32, device=x.device)
    for e in range(w1.shape[0]):
        token, j = torch.nonzero(indices == first + e, as_tuple=True)
        if token.numel() == 0:
            continue
        if mode == "fp4_weight_only":
            ws = [fp4_dequant_torch(w[e], s[e], torch.float32) for w, s in ((w1, w1_s), (w3, w3_s), (w2, w2_s))]
        else:
            ws = [w[e].float() if s is None else weight_dequant_torch(w[e], s[e], (128, 128), torch.float32)
                  for w, s in ((w1, w1_s), (w3, w3_s), (w2, w2_s))]
        a = _quant_dequant(x[token].float(), scale_fmt) if mode == "block_scaled" else x[token].float()
        gate, up = a @ ws[0].T, a @ ws[1].T
        if swiglu_limit > 0:
            gate, up = gate.clamp(max=swiglu_limit), up.clamp(-swiglu_limit, swiglu_limit)
        h = torch.nn.functional.silu(gate) * up
        weight = route_w[token, j, None].float()
        if route_on_h:
            h = h * weight
        if mode == "block_scaled":
            h = _quant_dequant(h.to(torch.bfloat16).float(), scale_fmt)
        elif mode in ("plain", "fp4_weight_only"):
            h = h.to(x.dtype).float()
        y.index_add_(0, token, h @ ws[2].T if route_on_h else (h @ ws[2].T) * weight)
    return y


def _quant_dequant(x: torch.Tensor, scale_fmt: str | None = None) -> torch.Tensor:
    q, s = act_quant_torch(x.to(torch.bfloat16), 128, scale_fmt)
    k = x.shape[-1]
    padded = torch.nn.functional.pad(q.float(), (0, s.shape[-1] * 128 - k))
    return (padded.view(*x.shape[:-1], -1, 128) * s[..., None]).flatten(-2)[..., :k]
