"""The routing kernels against their twins (Triton's interpreter on CPU) for every released router shape, V4's
hash routing among them, and the twins against the formulas written out in float64."""

import pytest
import torch

from dsinfer.kernels.moe_gate_triton import (
    ROUTER_GEMV_BYTES,
    hash_route,
    hash_route_torch,
    route,
    route_torch,
    router_logits,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = {   # E, n_groups, topk_groups, k, score_func, bias, norm, scale
    "v2-lite softmax greedy": (64, 1, 1, 6, "softmax", False, False, 1.0),
    "v2 group-limited": (160, 8, 3, 6, "softmax", False, False, 16.0),
    "v3 noaux_tc": (256, 8, 4, 8, "sigmoid", True, True, 2.5),
    "v3 no groups": (16, 1, 1, 4, "sigmoid", True, True, 2.5),
    "tiny groups of 2": (8, 4, 2, 2, "sigmoid", True, False, 1.0),
    "k = 1": (12, 1, 1, 1, "softmax", False, True, 1.0),
    "v4 sqrt-softplus": (256, 1, 1, 6, "sqrtsoftplus", True, True, 1.5),
}


@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("case", list(CASES))
def test_route_equals_twin(case, T):
    E, G, TG, k, func, has_bias, norm, scale = CASES[case]
    g = torch.Generator().manual_seed(T)
    logits = (torch.randn(T, E, generator=g) * 2).to(DEVICE)
    bias = (torch.randn(E, generator=g) * 0.5).to(DEVICE) if has_bias else None
    w, idx = route(logits, bias, G, TG, k, func, norm, scale)
    w_ref, idx_ref = route_torch(logits, bias, G, TG, k, func, norm, scale)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)


def test_sqrtsoftplus_twin_is_the_v4_router():
    """route_torch's V4 scores against the formula written out: sqrt(log(1 + e^z)) in float64, top-k of score +
    bias, the chosen scores renormalised and scaled."""
    g = torch.Generator().manual_seed(3)
    logits, bias = torch.randn(5, 32, generator=g) * 4, torch.randn(32, generator=g)
    w, idx = route_torch(logits, bias, 1, 1, 4, "sqrtsoftplus", True, 1.5)
    scores = torch.log1p(logits.double().exp()).sqrt()
    want_idx = (scores + bias.double()).topk(4, dim=-1).indices
    want_w = scores.gather(1, want_idx)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(w.double(), want_w / want_w.sum(-1, keepdim=True) * 1.5, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("T,k", [(1, 6), (5, 6), (3, 1)])
def test_hash_route_equals_the_formula(T, k):
    """Experts from the table row of each token id; weights sqrt(log(1 + e^z)) of those logits in float64 (large
    logits past softplus' threshold included), renormalised and scaled; the kernel equals its twin."""
    g = torch.Generator().manual_seed(T * k)
    logits = torch.randn(T, 32, generator=g) * 4
    logits[0, :4] = torch.tensor([25.0, -30.0, 0.0, 19.9])
    table = torch.stack([torch.randperm(32, generator=g)[:k] for _ in range(50)])
    table[7, :min(k, 4)] = torch.arange(min(k, 4))
    ids = torch.randint(0, 50, (T,), generator=g)
    ids[0] = 7
    want_idx = table[ids]
    z = logits.double().gather(1, want_idx)
    scores = torch.where(z > 20, z, torch.log1p(z.exp())).sqrt()
    want_w = scores / scores.sum(-1, keepdim=True) * 1.5
    w_ref, idx_ref = hash_route_torch(logits, ids, table, 1.5)
    assert torch.equal(idx_ref, want_idx)
    torch.testing.assert_close(w_ref.double(), want_w, rtol=1e-6, atol=1e-7)
    w, idx = hash_route(logits.to(DEVICE), ids.to(DEVICE), table.to(DEVICE), 1.5)
    assert torch.equal(idx.cpu(), want_idx) and idx.dtype == torch.int64
    torch.testing.assert_close(w.cpu(), w_ref, rtol=1e-5, atol=1e-6)


def test_route_rejects_an_unknown_score_func():
    with pytest.raises(ValueError, match="unknown score_func 'relu'; choose one of softmax, sigmoid, sqrtsoftplus"):
        route(torch.zeros(1, 8, device=DEVICE), None, 1, 1, 2, "relu", False, 1.0)


def test_route_rejects_uneven_groups():
    with pytest.raises(ValueError, match="divisible by 3 groups"):
        route(torch.zeros(1, 8, device=DEVICE), None, 3, 1, 2, "softmax", False, 1.0)


@pytest.mark.parametrize("T", [0, 1, 3, 64])
@pytest.mark.parametrize("E, D", [(64, 2048), (6, 100), (5, 4100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_logits_equal_a_float64_product(T, E, D, dtype):
    """The GEMV (odd expert counts, a width that is no power of two and one past two 2048-wide chunks) and the
    cuBLAS fallback past ROUTER_GEMV_BYTES: x in its dtype times the float32 weight, summed in float32."""
    g = torch.Generator().manual_seed(T + E)
    x = torch.randn(T, D, generator=g).to(dtype)
    w = torch.randn(E, D, generator=g)
    ref = x.double() @ w.double().T
    got = router_logits(x.to(DEVICE), w.to(DEVICE))
    assert got.dtype == torch.float32 and got.shape == (T, E)
    torch.testing.assert_close(got.cpu().double(), ref, rtol=1e-5, atol=1e-4)


def test_router_logits_of_a_token_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 300, generator=g).to(DEVICE), torch.randn(16, 300, generator=g).to(DEVICE)
    assert 9 * w.numel() * 4 <= ROUTER_GEMV_BYTES
    assert torch.equal(router_logits(x, w)[4], router_logits(x[4:5], w)[0])


def test_router_logits_reject_a_mismatched_weight():
    with pytest.raises(ValueError, match="router weight must be"):
        router_logits(torch.zeros(1, 8, device=DEVICE), torch.zeros(4, 9, device=DEVICE))
