"""Fused MoE kernel against its twin, the per-expert loop (Triton interpreter on CPU, real kernels on CUDA)."""

import pytest
import torch

from dsinfer.kernels.fp8 import weight_quant_torch
from dsinfer.kernels.fused_moe import align_slots, align_slots_torch, fused_mlp, fused_moe, fused_moe_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _routing(T, k, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else \
        torch.empty(0, k, dtype=torch.int64)
    weights = torch.rand(T, k, generator=g)
    return weights.to(DEVICE), indices.to(DEVICE)


@pytest.mark.parametrize("align", [align_slots, align_slots_torch])
@pytest.mark.parametrize("T,k,E,block_m", [(1, 2, 8, 16), (5, 3, 8, 16), (40, 2, 4, 16), (7, 1, 3, 4), (300, 6, 64, 16)])
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


def _weights(E, I, D, dtype, fp8, seed=1):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(E, n, m, generator=g) / m ** 0.5 for n, m in ((I, D), (D, I), (I, D))]
    if not fp8:
        return [w.to(DEVICE, dtype) for w in ws], [None] * 3
    qs = [[weight_quant_torch(w[e]) for e in range(E)] for w in ws]
    return ([torch.stack([q for q, _ in q_e]).to(DEVICE) for q_e in qs],
            [torch.stack([s for _, s in q_e]).to(DEVICE) for q_e in qs])


def _close(got, want, dtype, mode):
    """block_scaled quantizes activations to FP8 in both; a value that rounds differently in bf16 first can land
    on the next FP8 code (6% apart), so compare its relative error over the whole output instead."""
    if mode == "block_scaled":
        assert (got - want).norm().item() <= 1e-2 * want.norm().item()
    else:
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


MODES = ["plain", "weight_only"] + (["block_scaled"] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T,k,E,I,D", [(1, 2, 8, 32, 64), (9, 3, 8, 40, 72), (33, 2, 4, 160, 136)])
@pytest.mark.parametrize("first,n_local", [(0, None), (4, 2)])
def test_fused_moe_matches_loop(mode, T, k, E, I, D, first, n_local):
    n_local = n_local or E
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    (w1, w2, w3), (s1, s2, s3) = _weights(n_local, I, D, dtype, fp8=mode != "plain")
    route_w, indices = _routing(T, k, E)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    got = fused_moe(x, route_w, indices, w1, w2, w3, s1, s2, s3, first=first, mode=mode)
    want = fused_moe_torch(x, route_w, indices, w1, w2, w3, s1, s2, s3, first=first, mode=mode)
    assert got.shape == (T, D) and got.dtype == torch.float32
    _close(got, want, dtype, mode)
    assert want.abs().sum() > 0 or not ((indices >= first) & (indices < first + n_local)).any()


def test_fused_moe_rejects_unknown_mode():
    (w1, w2, w3), _ = _weights(2, 32, 64, torch.float32, fp8=False)
    route_w, indices = _routing(1, 1, 2)
    with pytest.raises(ValueError, match="choose one of"):
        fused_moe(torch.zeros(1, 64, device=DEVICE), route_w, indices, w1, w2, w3, mode="int4")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T,I,D", [(1, 32, 64), (21, 160, 136)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_fused_mlp_matches_swiglu(mode, T, I, D, accumulate):
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    (w1, w2, w3), (s1, s2, s3) = _weights(1, I, D, dtype, fp8=mode != "plain")
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    base = torch.randn(T, D, device=DEVICE)
    want = fused_moe_torch(x, torch.ones(T, 1, device=DEVICE), torch.zeros(T, 1, dtype=torch.long, device=DEVICE),
                           w1, w2, w3, s1, s2, s3, mode=mode) + (base if accumulate else 0)
    got = fused_mlp(x, w1[0], w2[0], w3[0], *(None if s is None else s[0] for s in (s1, s2, s3)), mode=mode,
                    out=base.clone() if accumulate else None)
    _close(got, want, dtype, mode)
