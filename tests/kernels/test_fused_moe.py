"""Fused MoE kernel against its twin, the per-expert loop (Triton interpreter on CPU, real kernels on CUDA); the FP4
mode also against a float64 MoE over weights decoded bit by bit here."""

import math

import pytest
import torch
import triton
import triton.language as tl

from dsinfer.kernels import fused_moe as fused_moe_module
from dsinfer.kernels.fp8 import weight_quant_torch
from dsinfer.kernels.fp8_gemv import fp8_gemv
from dsinfer.kernels.fused_moe import (
    align_slots,
    align_slots_torch,
    e2m1_to_float,
    fused_mlp,
    fused_moe,
    fused_moe_slots,
    fused_moe_torch,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _routing(T, k, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else \
        torch.empty(0, k, dtype=torch.int64)
    weights = torch.rand(T, k, generator=g)
    return weights.to(DEVICE), indices.to(DEVICE)


@pytest.mark.parametrize("align", [align_slots, align_slots_torch])
@pytest.mark.parametrize("T,k,E,block_m", [(1, 2, 8, 16), (5, 3, 8, 16), (40, 2, 4, 16), (7, 1, 3, 4),
                                           (1, 6, 64, 16), (3, 6, 64, 16), (300, 6, 64, 16), (64, 8, 256, 16)])
@pytest.mark.parametrize("first,n_local", [(0, None), (2, 3)])
def test_align_slots_groups_every_local_slot_once(align, T, k, E, block_m, first, n_local):
    n_local = n_local or E
    _, indices = _routing(T, k, E)
    slots, block_expert = align(indices, first, n_local, block_m)
    assert slots.numel() % block_m == 0 and block_expert.numel() == slots.numel() // block_m
    flat = indices.flatten().cpu()
    seen = []
    for b, e in enumerate(block_expert.tolist()):
        tile = slots[b * block_m:(b + 1) * block_m].tolist()
        real = [s for s in tile if s < T * k]
        if e < 0:
            assert not real
            continue
        assert all(flat[s] == first + e for s in real)      # a tile holds one expert's slots
        assert real == sorted(real)                          # in token order (a stable sort)
        seen += real
    local = [s for s in range(T * k) if first <= flat[s] < first + n_local]
    assert sorted(seen) == local                           # each local slot exactly once, others dropped
    used = (block_expert >= 0).sum().item()                # used tiles come first, within the bound
    assert block_expert.numel() == T * k // block_m + min(T * k, n_local)
    assert (block_expert[:used] >= 0).all() and used <= block_expert.numel()


def test_fused_moe_fills_every_launched_tile():
    """The slot list has only T*k // block_m + min(T*k, n_local) tiles: routing that fills all of them (each
    expert one slot past a whole tile) still gives the twin's output."""
    E, per, D, inter = 4, 17, 64, 32                       # block_m is 16 here: every expert takes two tiles
    order = torch.randperm(E * per, generator=torch.Generator().manual_seed(0))
    indices = torch.arange(E).repeat_interleave(per)[order][:, None].to(DEVICE)
    route_w = torch.rand(E * per, 1, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    (w1, w2, w3), _ = _weights(E, inter, D, dtype, fp8=False)
    x = torch.randn(E * per, D, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    _, block_expert = align_slots(indices, 0, E, 16)
    assert (block_expert >= 0).sum().item() == block_expert.numel() == E * per // 16 + E    # the bound, reached
    _close(fused_moe(x, route_w, indices, w1, w2, w3), fused_moe_torch(x, route_w, indices, w1, w2, w3), dtype,
           "plain")


def _weights(E, inter, D, dtype, fp8, seed=1):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(E, n, m, generator=g) / m ** 0.5 for n, m in ((inter, D), (D, inter), (inter, D))]
    if not fp8:
        return [w.to(DEVICE, dtype) for w in ws], [None] * 3
    qs = [[weight_quant_torch(w[e]) for e in range(E)] for w in ws]
    return ([torch.stack([q for q, _ in q_e]).to(DEVICE) for q_e in qs],
            [torch.stack([s for _, s in q_e]).to(DEVICE) for q_e in qs])


def _close(got, want, dtype, mode):
    """block_scaled quantizes activations to FP8 in both; a value that rounds differently in bf16 first can land
    on the next FP8 code (6% apart), so compare its relative error over the whole output instead."""
    if mode == "block_scaled":    # FP8 tensor cores sum in ~14 bits (test_fp8_triton.py): more codes flip on a GPU
        assert (got - want).norm().item() <= (3e-2 if got.is_cuda else 1e-2) * want.norm().item()
    else:
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


MODES = ["plain", "weight_only"] + (["block_scaled"] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T,k,E,inter,D", [(1, 2, 8, 32, 64), (9, 3, 8, 40, 72), (33, 2, 4, 160, 136)])
@pytest.mark.parametrize("first,n_local", [(0, None), (4, 2)])
def test_fused_moe_matches_loop(mode, T, k, E, inter, D, first, n_local):
    n_local = n_local or E
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    (w1, w2, w3), (s1, s2, s3) = _weights(n_local, inter, D, dtype, fp8=mode != "plain")
    route_w, indices = _routing(T, k, E)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    got = fused_moe(x, route_w, indices, w1, w2, w3, s1, s2, s3, first=first, mode=mode)
    want = fused_moe_torch(x, route_w, indices, w1, w2, w3, s1, s2, s3, first=first, mode=mode)
    assert got.shape == (T, D) and got.dtype == torch.float32
    _close(got, want, dtype, mode)
    assert want.abs().sum() > 0 or not ((indices >= first) & (indices < first + n_local)).any()


@pytest.mark.parametrize("first,n_local", [(0, 8), (3, 4)])
def test_one_token_runs_a_tile_per_slot_even_with_repeated_experts(first, n_local):
    """At one token the slots skip the alignment (one tile each): a repeated expert (no router picks one, but a
    caller may) is computed twice and both slots count; other ranks' experts add nothing."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    (w1, w2, w3), _ = _weights(n_local, 32, 64, dtype, fp8=False)
    indices = torch.tensor([[5, 1, 5, 6]], device=DEVICE)
    route_w = torch.tensor([[0.5, 0.25, 0.125, 1.0]], device=DEVICE)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(6)).to(DEVICE, dtype)
    got = fused_moe(x, route_w, indices, w1, w2, w3, first=first)
    want = fused_moe_torch(x, route_w, indices, w1, w2, w3, first=first)
    _close(got, want, dtype, "plain")
    assert want.abs().sum() > 0


def test_fused_moe_rejects_unknown_mode():
    (w1, w2, w3), _ = _weights(2, 32, 64, torch.float32, fp8=False)
    route_w, indices = _routing(1, 1, 2)
    with pytest.raises(ValueError, match="choose one of"):
        fused_moe(torch.zeros(1, 64, device=DEVICE), route_w, indices, w1, w2, w3, mode="int4")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T,inter,D", [(1, 32, 64), (21, 160, 136)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_fused_mlp_matches_swiglu(mode, T, inter, D, accumulate):
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    (w1, w2, w3), (s1, s2, s3) = _weights(1, inter, D, dtype, fp8=mode != "plain")
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    base = torch.randn(T, D, device=DEVICE)
    want = fused_moe_torch(x, torch.ones(T, 1, device=DEVICE), torch.zeros(T, 1, dtype=torch.long, device=DEVICE),
                           w1, w2, w3, s1, s2, s3, mode=mode) + (base if accumulate else 0)
    got = fused_mlp(x, w1[0], w2[0], w3[0], *(None if s is None else s[0] for s in (s1, s2, s3)), mode=mode,
                    out=base.clone() if accumulate else None)
    _close(got, want, dtype, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T,k,E", [(1, 6, 16), (3, 2, 8), (64, 3, 4)])
@pytest.mark.parametrize("first,n_local", [(0, None), (2, 3)])
def test_shared_mlp_sums_the_routed_slots(mode, T, k, E, first, n_local):
    """fused_moe_slots then fused_mlp(routed=): the routed experts' twin plus the shared MLP's, stored in the
    activation dtype by the down projection's epilogue (slots of other ranks' experts, never written, skipped;
    at T=64 over 4 experts some experts have many slots, at T=1 over 16 most have none)."""
    n_local = n_local or E
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    D, inter, shared = 72, 40, 48
    (w1, w2, w3), (s1, s2, s3) = _weights(n_local, inter, D, dtype, fp8=mode != "plain")
    (v1, v2, v3), (t1, t2, t3) = _weights(1, shared, D, dtype, fp8=mode != "plain", seed=4)
    route_w, indices = _routing(T, k, E, seed=T)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    want = fused_moe_torch(x, route_w, indices, w1, w2, w3, s1, s2, s3, first=first, mode=mode)
    want += fused_moe_torch(x, torch.ones(T, 1, device=DEVICE), torch.zeros(T, 1, dtype=torch.long, device=DEVICE),
                            v1, v2, v3, t1, t2, t3, mode=mode)
    routed = fused_moe_slots(x, route_w, indices, w1, w2, w3, s1, s2, s3, first=first, mode=mode)
    routed.out[(indices.flatten() < first) | (indices.flatten() >= first + n_local)] = float("nan")   # unwritten
    got = fused_mlp(x, v1[0], v2[0], v3[0], *(None if s is None else s[0] for s in (t1, t2, t3)), mode=mode,
                    routed=routed, out_dtype=dtype)
    assert got.dtype == dtype and got.shape == (T, D)
    _close(got.float(), want.to(dtype).float(), dtype, mode)


def test_routed_slots_must_belong_to_x():
    (w1, w2, w3), _ = _weights(2, 32, 64, torch.float32, fp8=False)
    route_w, indices = _routing(3, 2, 2)
    x = torch.randn(3, 64, device=DEVICE)
    routed = fused_moe_slots(x, route_w, indices, w1, w2, w3)
    with pytest.raises(ValueError, match="do not belong"):
        fused_mlp(x[:2], w1[0], w2[0], w3[0], routed=routed)


# --- FP4 experts (DeepSeek-V4) ------------------------------------------------------------------------------------

def e2m1_bits(code: int) -> float:
    """The e2m1 value of a 4-bit code from its bits: sign | 2 exponent bits (bias 1) | 1 mantissa bit."""
    sign, exp, man = code >> 3, (code >> 1) & 3, code & 1
    mag = man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1 + man / 2)
    return -mag if sign else mag


def fp4_oracle(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(..., N, K/2) bytes, (..., N, K/32) E8M0 bytes -> (..., N, K) float64, decoded bit by bit (element 2k in the
    low nibble of byte k)."""
    table = torch.tensor([e2m1_bits(c) for c in range(16)], dtype=torch.float64)
    b = packed.cpu().view(torch.uint8).long()
    codes = torch.stack([b % 16, b // 16], dim=-1).flatten(-2)
    s = torch.tensor([2.0 ** (v - 127) for v in range(256)], dtype=torch.float64)[scale.cpu().view(torch.uint8).long()]
    return table[codes] * s.repeat_interleave(32, dim=-1)


def _fp4_weights(E, inter, D, seed=1, scale_bytes=(118, 126)):
    """Random packed codes (every one of the 16) and E8M0 scales: w1, w3 (E, inter, D/2), w2 (E, D, inter/2)."""
    g = torch.Generator().manual_seed(seed)
    shapes = ((inter, D), (D, inter), (inter, D))
    ws = [torch.randint(0, 256, (E, n, m // 2), generator=g, dtype=torch.uint8) for n, m in shapes]
    ss = [torch.randint(*scale_bytes, (E, n, m // 32), generator=g, dtype=torch.uint8) for n, m in shapes]
    return [w.to(DEVICE) for w in ws], [s.to(DEVICE) for s in ss]


def _moe_oracle(x, route_w, indices, w1, w2, w3, first, limit, route_on_h):
    """The routed experts in float64 from bit-level decoded weights: sum_j w_j * W2 (silu(min(g, L)) * clamp(u))."""
    x, route_w, indices = x.cpu().double(), route_w.cpu().double(), indices.cpu()
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(indices.shape[1]):
            e = int(indices[t, j]) - first
            if not 0 <= e < w1.shape[0]:
                continue
            g, u = w1[e] @ x[t], w3[e] @ x[t]
            if limit > 0:
                g, u = g.clamp(max=limit), u.clamp(-limit, limit)
            h = torch.nn.functional.silu(g) * u
            y[t] += w2[e] @ (h * route_w[t, j]) if route_on_h else route_w[t, j] * (w2[e] @ h)
    return y


@triton.jit
def _decode_kernel(code_ptr, scale_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = e2m1_to_float(tl.load(code_ptr + offs, mask=mask, other=0), tl.load(scale_ptr + offs, mask=mask, other=0))
    tl.store(out_ptr + offs, v, mask=mask)


def test_e2m1_decode_every_code_and_scale_byte():
    """Every (code, scale byte) pair against the bit-level decoder; results stay normal floats from byte 2 up (on
    CPU the two subnormal bytes are checked too), byte 255 is NaN, large bytes overflow to inf as in float32."""
    low = 0 if DEVICE == "cpu" else 2
    codes = torch.arange(16, dtype=torch.uint8).repeat(256 - low)
    scales = torch.arange(low, 256, dtype=torch.int32).repeat_interleave(16).to(torch.uint8)
    out = torch.empty(codes.numel(), dtype=torch.float32, device=DEVICE)
    _decode_kernel[(triton.cdiv(codes.numel(), 256),)](codes.to(DEVICE), scales.to(DEVICE), out, codes.numel(),
                                                        BLOCK=256)
    want = torch.tensor([math.nan if s == 255 else e2m1_bits(int(c)) * 2.0 ** (int(s) - 127)
                         for c, s in zip(codes, scales)], dtype=torch.float64).float()
    torch.testing.assert_close(out.cpu(), want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("T,k,E,inter,D", [(1, 2, 8, 32, 64), (9, 3, 8, 96, 160), (40, 2, 4, 64, 128)])
@pytest.mark.parametrize("first,n_local", [(0, None), (4, 2)])
@pytest.mark.parametrize("limit,route_on_h", [(0.0, False), (0.4, True)])
def test_fused_moe_fp4_matches_bit_decoder_and_twin(T, k, E, inter, D, first, n_local, limit, route_on_h):
    n_local = n_local or E
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    (w1, w2, w3), (s1, s2, s3) = _fp4_weights(n_local, inter, D)
    route_w, indices = _routing(T, k, E)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    kw = dict(first=first, mode="fp4_weight_only", swiglu_limit=limit, route_on_h=route_on_h)
    got = fused_moe(x, route_w, indices, w1, w2, w3, s1, s2, s3, **kw)
    twin = fused_moe_torch(x, route_w, indices, w1, w2, w3, s1, s2, s3, **kw)
    oracle = _moe_oracle(x, route_w, indices, fp4_oracle(w1, s1), fp4_oracle(w2, s2), fp4_oracle(w3, s3), first,
                         limit, route_on_h)
    assert got.shape == (T, D) and got.dtype == torch.float32
    if dtype == torch.bfloat16:   # h is stored in bf16: a product summed in another order can round to the
        for ref in (twin, oracle):  # neighbouring bf16 value, so compare over the whole output
            ref = ref.to(got.device).float()
            assert (got - ref).norm().item() <= 1e-2 * ref.norm().item()
    else:
        torch.testing.assert_close(got, twin, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.cpu().double(), oracle, atol=1e-4, rtol=1e-4)
    assert oracle.abs().sum() > 0 or not ((indices >= first) & (indices < first + n_local)).any().item()


@pytest.mark.parametrize("inter,D", [(32, 64), (96, 160), (64, 1024)])
def test_one_token_fp4_with_bf16_activations(inter, D):
    """Batch-1 decode's FP4 matrix-vector path as the model runs it (bf16 x, read as 64-bit words), chunks that
    divide K and one that does not (D = 160: 20 words), against the bit-level oracle."""
    (w1, w2, w3), (s1, s2, s3) = _fp4_weights(6, inter, D)
    route_w, indices = _routing(1, 3, 6)
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(2)).to(DEVICE, torch.bfloat16)
    got = fused_moe(x, route_w, indices, w1, w2, w3, s1, s2, s3, mode="fp4_weight_only", swiglu_limit=0.4,
                    route_on_h=True)
    oracle = _moe_oracle(x, route_w, indices, fp4_oracle(w1, s1), fp4_oracle(w2, s2), fp4_oracle(w3, s3), 0, 0.4,
                         True)
    assert (got.cpu().double() - oracle).norm().item() <= 1e-2 * oracle.norm().item()


@pytest.mark.parametrize("mode,scale_fmt", [("weight_only", None), ("block_scaled", None),
                                            ("block_scaled", "ue8m0")])
@pytest.mark.parametrize("routed", [False, True])
def test_one_token_fp8_mlp(mode, scale_fmt, routed, monkeypatch):
    """A dense FP8 MLP at one token runs as matrix-vector products (kernels/fp8_gemv.py; block-scaled too, on CPU
    through the interpreter), the routed slots added in the down projection's epilogue, against the twins; with
    ue8m0 both products quantize with power-of-two scales (V3.1, V4), as the model's linear layers do (the
    coarser scales make a one-ulp difference in h flip more FP8 codes: a looser bound)."""
    seen = []

    def recording(*args, **kw):
        seen.append(kw.get("scale_fmt"))
        return fp8_gemv(*args, **kw)
    monkeypatch.setattr(fused_moe_module, "fp8_gemv", recording)
    D, inter = 136, 160
    (w1, w2, w3), (s1, s2, s3) = _weights(4, 40, D, torch.bfloat16, fp8=True)
    (v1, v2, v3), (t1, t2, t3) = _weights(1, inter, D, torch.bfloat16, fp8=True, seed=4)
    route_w, indices = _routing(1, 3, 6)
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.bfloat16)
    one = (torch.ones(1, 1, device=DEVICE), torch.zeros(1, 1, dtype=torch.long, device=DEVICE))
    want = fused_moe_torch(x, *one, v1, v2, v3, t1, t2, t3, mode=mode, scale_fmt=scale_fmt)
    kw = {}
    if routed:
        want += fused_moe_torch(x, route_w, indices, w1, w2, w3, s1, s2, s3, first=2, mode="weight_only")
        kw["routed"] = fused_moe_slots(x, route_w, indices, w1, w2, w3, s1, s2, s3, first=2, mode="weight_only")
    got = fused_mlp(x, v1[0], v2[0], v3[0], t1[0], t2[0], t3[0], mode=mode, out_dtype=torch.bfloat16,
                    scale_fmt=scale_fmt, **kw)
    assert got.dtype == torch.bfloat16 and got.shape == (1, D)
    assert seen == [scale_fmt, scale_fmt]                                        # gate/up and down
    bound = {"weight_only": 1e-2, "block_scaled": 3e-2 if scale_fmt is None else 6e-2}[mode]
    assert (got.float() - want).norm().item() <= bound * want.norm().item()


def test_fp4_weights_pass_as_int8_and_e8m0_views():
    """The loader's uint8 bytes, the checkpoint's int8 codes and float8_e8m0fnu scales give the same result."""
    (w1, w2, w3), (s1, s2, s3) = _fp4_weights(4, 64, 64)
    route_w, indices = _routing(5, 2, 4)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    a = fused_moe(x, route_w, indices, w1, w2, w3, s1, s2, s3, mode="fp4_weight_only")
    b = fused_moe(x, route_w, indices, w1.view(torch.int8), w2.view(torch.int8), w3.view(torch.int8),
                  s1.view(torch.float8_e8m0fnu), s2.view(torch.float8_e8m0fnu), s3.view(torch.float8_e8m0fnu),
                  mode="fp4_weight_only")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["plain", "weight_only"])
def test_clamp_and_route_on_h_in_every_mode(mode):
    """The clamp changes the result (the limit is below the gate/up range) and the kernel follows the twin; routing
    on h equals routing after the down projection up to the rounding of h."""
    T, k, E, inter, D = 12, 2, 4, 64, 128
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    (w1, w2, w3), (s1, s2, s3) = _weights(E, inter, D, dtype, fp8=mode != "plain")
    route_w, indices = _routing(T, k, E)
    x = (3 * torch.randn(T, D, generator=torch.Generator().manual_seed(2))).to(DEVICE, dtype)
    args = (x, route_w, indices, w1, w2, w3, s1, s2, s3)
    free = fused_moe_torch(*args, mode=mode)
    for route_on_h in (False, True):
        want = fused_moe_torch(*args, mode=mode, swiglu_limit=1.0, route_on_h=route_on_h)
        got = fused_moe(*args, mode=mode, swiglu_limit=1.0, route_on_h=route_on_h)
        _close(got, want, dtype, mode)
        assert (want - free).abs().max() > 0.1 * free.abs().max()
    a, b = (fused_moe(*args, mode=mode, swiglu_limit=1.0, route_on_h=r) for r in (False, True))
    _close(a, b, dtype, mode)


@pytest.mark.parametrize("mode", ["plain", "weight_only", "fp4_weight_only"])
def test_fused_mlp_clamped(mode):
    """V4's shared expert: the clamped SwiGLU through fused_mlp (FP8 in the release; FP4 for completeness)."""
    T, inter, D = 7, 64, 96
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    if mode == "fp4_weight_only":
        (w1, w2, w3), (s1, s2, s3) = _fp4_weights(1, inter, D, scale_bytes=(124, 128))
    else:
        (w1, w2, w3), (s1, s2, s3) = _weights(1, inter, D, dtype, fp8=mode != "plain")
    x = (3 * torch.randn(T, D, generator=torch.Generator().manual_seed(3))).to(DEVICE, dtype)
    ones, zeros = torch.ones(T, 1, device=DEVICE), torch.zeros(T, 1, dtype=torch.long, device=DEVICE)
    want = fused_moe_torch(x, ones, zeros, w1, w2, w3, s1, s2, s3, mode=mode, swiglu_limit=0.5)
    assert (want - fused_moe_torch(x, ones, zeros, w1, w2, w3, s1, s2, s3, mode=mode)).abs().max() > 0
    got = fused_mlp(x, w1[0], w2[0], w3[0], *(None if s is None else s[0] for s in (s1, s2, s3)), mode=mode,
                    swiglu_limit=0.5)
    _close(got, want, dtype, mode)


@pytest.mark.parametrize("edit, error, message", [
    (lambda w, s: (w, [s[0].float(), s[1], s[2]]), TypeError, "w1_s must be uint8 or float8_e8m0fnu"),
    (lambda w, s: (w, [s[0][:, :, :1].contiguous(), s[1], s[2]]), ValueError, "w1_s must be a contiguous"),
    (lambda w, s: ([w[0], w[1][:, :, :8].contiguous(), w[2]], s), ValueError, "w2 must be a contiguous"),
    (lambda w, s: (w, [s[0], None, s[2]]), ValueError, "needs the E8M0 scales w2_s"),
])
def test_fp4_argument_errors(edit, error, message):
    ws, ss = _fp4_weights(2, 32, 64)
    (w1, w2, w3), (s1, s2, s3) = edit(ws, ss)
    route_w, indices = _routing(1, 1, 2)
    with pytest.raises(error, match=message):
        fused_moe(torch.zeros(1, 64, device=DEVICE), route_w, indices, w1, w2, w3, s1, s2, s3,
                  mode="fp4_weight_only")
