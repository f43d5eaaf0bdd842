"""Hyper-connection mixing with Sinkhorn: the PyTorch twins against a per-token reference written from the spec
(section 2.9; the whole model is also checked against HF transformers in tests/models), and the Triton kernels
(Triton's interpreter on CPU) against the twins. Grids cross hc that is not a power of two, ragged D (partial last
block, several blocks), float32 and bfloat16 streams, one and twenty Sinkhorn iterations."""

import pytest
import torch

from dsinfer.kernels import hyper_connections as hck
from dsinfer.kernels.hyper_connections import hc_mixes_torch as _mixes
from dsinfer.kernels.hyper_connections import hc_post, hc_post_torch, hc_pre, hc_pre_mix, hc_pre_mix_torch, hc_pre_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"     # CPU: Triton's interpreter (set in conftest)
EPS, NORM_EPS = 1e-6, 1e-6
BF16_ULP = 2.0 ** -7                                        # bf16 keeps 8 significant bits: 1 ulp <= 2^-7 relative


def case(T, hc, D, dtype, seed=0):
    """Streams x, the mHC parameters (fn, scale, base) and a sublayer output, as the model holds them."""
    g = torch.Generator().manual_seed(seed)
    mix = (2 + hc) * hc
    x = torch.randn(T, hc, D, generator=g).to(dtype)
    fn = torch.randn(mix, hc * D, generator=g) * (hc * D) ** -0.5
    scale = torch.tensor([0.8, 0.6, 1.5])
    base = torch.randn(mix, generator=g) * 0.5
    out = torch.randn(T, D, generator=g).to(dtype)
    return x, fn, scale, base, out


def reference_pre(x, mixes, scale, base, iters, eps):
    """Token by token, in float64: pre/post sigmoids, then softmax rows + eps, a column pass, and iters - 1 rounds
    of a row pass and a column pass (each sum + eps)."""
    T, hc, _ = x.shape
    ys, posts, combs = [], [], []
    for t in range(T):
        m, b, s = mixes[t].double(), base.double(), scale.double()
        pre = torch.sigmoid(m[:hc] * s[0] + b[:hc]) + eps
        posts.append(2 * torch.sigmoid(m[hc:2 * hc] * s[1] + b[hc:2 * hc]))
        c = torch.softmax((m[2 * hc:] * s[2] + b[2 * hc:]).view(hc, hc), dim=1) + eps
        c = c / (c.sum(0, keepdim=True) + eps)
        for _ in range(iters - 1):
            c = c / (c.sum(1, keepdim=True) + eps)
            c = c / (c.sum(0, keepdim=True) + eps)
        combs.append(c)
        ys.append(sum(pre[k] * x[t, k].double() for k in range(hc)))
    return torch.stack(ys), torch.stack(posts), torch.stack(combs)


def reference_post(out, x, post, comb):
    T, hc, _ = x.shape
    return torch.stack([torch.stack([post[t, k].double() * out[t].double()
                                     + sum(comb[t, j, k].double() * x[t, j].double() for j in range(hc))
                                     for k in range(hc)]) for t in range(T)])


def close(got, want, dtype):
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=BF16_ULP, atol=1e-5)
    torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,hc,D,iters", [(1, 4, 64, 20), (3, 3, 100, 1), (2, 2, 257, 20), (5, 4, 32, 3)])
def test_twins_equal_a_per_token_reference(T, hc, D, iters, dtype):
    x, fn, scale, base, out = case(T, hc, D, dtype)
    mixes = _mixes(x, fn, NORM_EPS)
    want_y, want_post, want_comb = reference_pre(x, mixes, scale, base, iters, EPS)
    y, post, comb = hc_pre_mix_torch(x, mixes, scale, base, iters, EPS)
    assert y.dtype == dtype and post.dtype == comb.dtype == torch.float32
    close(y, want_y.to(dtype), dtype)
    torch.testing.assert_close(post.double(), want_post, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(comb.double(), want_comb, rtol=1e-5, atol=1e-6)
    new = hc_post_torch(out, x, post, comb)
    assert new.dtype == dtype and new.shape == (T, hc, D)
    close(new, reference_post(out, x, post, comb).to(dtype), dtype)


@pytest.mark.parametrize("iters", [1, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 100, 257])
@pytest.mark.parametrize("hc", [4, 2, 3])
@pytest.mark.parametrize("T", [1, 3])
def test_pre_mix_kernel_equals_twin(T, hc, D, dtype, iters):
    pytest.importorskip("triton")
    x, fn, scale, base, _ = case(T, hc, D, dtype, seed=1)
    mixes = _mixes(x, fn, NORM_EPS)
    want_y, want_post, want_comb = hc_pre_mix_torch(x, mixes, scale, base, iters, EPS)
    y, post, comb = (t.cpu() for t in hc_pre_mix(x.to(DEVICE), mixes.to(DEVICE), scale.to(DEVICE),
                                                   base.to(DEVICE), iters, EPS))
    assert y.dtype == dtype and y.shape == (T, D)
    close(y, want_y, dtype)
    close(post, want_post, torch.float32)                   # post and comb are float32 whatever x is
    close(comb, want_comb, torch.float32)
    # Sinkhorn ends on a column pass: columns sum to 1 (less eps); after 20 passes the rows nearly do too
    torch.testing.assert_close(comb.sum(dim=1), torch.ones(T, hc), rtol=0, atol=1e-4)
    if iters == 20:
        torch.testing.assert_close(comb.sum(dim=2), torch.ones(T, hc), rtol=0, atol=1e-2)


def reference_mixes(x, fn, norm_eps):
    """float64: (flattened streams / their RMS) @ fn^T, token by token."""
    xf = x.flatten(1).double()
    return torch.stack([fn.double() @ (r / torch.sqrt(r.square().mean() + norm_eps)) for r in xf])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,hc,D", [(1, 4, 64), (3, 3, 100), (2, 4, 300), (2, 2, 257)])
def test_fused_pre_equals_twin_and_reference(T, hc, D, dtype, monkeypatch):
    """hc_pre forms the projection in split chunks (hc * D = 1200 spans three chunks of 512, a ragged last one);
    past FUSED_MAX_T tokens it takes the torch projection, with the same results."""
    pytest.importorskip("triton")
    x, fn, scale, base, _ = case(T, hc, D, dtype, seed=4)
    torch.testing.assert_close(_mixes(x, fn, NORM_EPS).double(), reference_mixes(x, fn, NORM_EPS), rtol=1e-5,
                               atol=1e-5)
    want = hc_pre_torch(x, fn, scale, base, 20, EPS, NORM_EPS)
    for max_t in (hck.FUSED_MAX_T, 0):
        monkeypatch.setattr(hck, "FUSED_MAX_T", max_t)
        got = hc_pre(*(t.to(DEVICE) for t in (x, fn, scale, base)), 20, EPS, NORM_EPS)
        for g, w, d in zip(got, want, (dtype, torch.float32, torch.float32)):
            assert g.dtype == w.dtype and g.shape == w.shape
            close(g.cpu(), w, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 100, 257])
@pytest.mark.parametrize("hc", [4, 2, 3])
@pytest.mark.parametrize("T", [1, 3])
def test_post_kernel_equals_twin(T, hc, D, dtype):
    pytest.importorskip("triton")
    x, fn, scale, base, out = case(T, hc, D, dtype, seed=2)
    _, post, comb = hc_pre_mix_torch(x, _mixes(x, fn, NORM_EPS), scale, base, 20, EPS)
    want = hc_post_torch(out, x, post, comb)
    got = hc_post(out.to(DEVICE), x.to(DEVICE), post.to(DEVICE), comb.to(DEVICE)).cpu()
    assert got.dtype == dtype and got.shape == (T, hc, D)
    close(got, want, dtype)


@pytest.mark.parametrize("hc", [1, 8])
def test_kernels_at_the_hc_limits(hc):
    pytest.importorskip("triton")
    x, fn, scale, base, out = case(2, hc, 40, torch.float32, seed=3)
    mixes = _mixes(x, fn, NORM_EPS)
    want = hc_pre_mix_torch(x, mixes, scale, base, 20, EPS)
    got = hc_pre_mix(x.to(DEVICE), mixes.to(DEVICE), scale.to(DEVICE), base.to(DEVICE), 20, EPS)
    for g, w in zip(got, want):
        close(g.cpu(), w, torch.float32)
    post, comb = want[1], want[2]
    close(hc_post(out.to(DEVICE), x.to(DEVICE), post.to(DEVICE), comb.to(DEVICE)).cpu(),
          hc_post_torch(out, x, post, comb), torch.float32)


def test_kernels_take_no_tokens():
    pytest.importorskip("triton")
    x, fn, scale, base, out = (t.to(DEVICE) for t in case(0, 4, 64, torch.bfloat16))
    y, post, comb = hc_pre_mix(x, torch.empty(0, 24, device=DEVICE), scale, base, 20, EPS)
    assert y.shape == (0, 64) and y.dtype == torch.bfloat16 and post.shape == (0, 4) and comb.shape == (0, 4, 4)
    y, post, comb = hc_pre(x, fn, scale, base, 20, EPS, NORM_EPS)
    assert y.shape == (0, 64) and y.dtype == torch.bfloat16 and post.shape == (0, 4) and comb.shape == (0, 4, 4)
    assert hc_post(out, x, post, comb).shape == (0, 4, 64)


def test_kernels_check_their_arguments():
    x, fn, scale, base, out = (t.to(DEVICE) for t in case(2, 4, 64, torch.bfloat16))
    mixes = _mixes(x, fn, NORM_EPS)
    _, post, comb = hc_pre_mix_torch(x, mixes, scale, base, 20, EPS)
    with pytest.raises(TypeError, match="mixes must be float32; got bfloat16"):
        hc_pre_mix(x, mixes.bfloat16(), scale, base, 20, EPS)
    with pytest.raises(TypeError, match="x must be float32, float16, bfloat16; got int32"):
        hc_pre_mix(x.int(), mixes, scale, base, 20, EPS)
    with pytest.raises(TypeError, match="out must be bfloat16; got float32"):
        hc_post(out.float(), x, post, comb)
    with pytest.raises(ValueError, match="x must be contiguous"):
        hc_pre_mix(torch.randn(2, 64, 4, device=DEVICE).bfloat16().transpose(1, 2), mixes, scale, base, 20, EPS)
    with pytest.raises(ValueError, match="x must be contiguous"):
        hc_post(out, x[:, :, ::2], post, comb)
    with pytest.raises(ValueError, match="shapes do not agree"):
        hc_pre_mix(x, mixes[:, :20].contiguous(), scale, base, 20, EPS)
    with pytest.raises(ValueError, match="shapes do not agree"):
        hc_pre_mix(x, mixes, scale[:2].contiguous(), base, 20, EPS)
    with pytest.raises(ValueError, match=r"needs fn \(24, 256\); got \(24, 128\)"):
        hc_pre(x, fn[:, :128].contiguous(), scale, base, 20, EPS, NORM_EPS)
    with pytest.raises(TypeError, match="fn must be float32; got bfloat16"):
        hc_pre(x, fn.bfloat16(), scale, base, 20, EPS, NORM_EPS)
    with pytest.raises(ValueError, match="shapes do not agree"):
        hc_pre(x, fn, scale, base[:3].contiguous(), 20, EPS, NORM_EPS)
    with pytest.raises(ValueError, match="shapes do not agree"):
        hc_post(out[:, :32].contiguous(), x, post, comb)
    with pytest.raises(ValueError, match="shapes do not agree"):
        hc_post(out, x, post, comb[:1].contiguous())
    with pytest.raises(ValueError, match="1 to 8 hyper-connection streams"):
        hc_post(out, torch.zeros(2, 9, 64, dtype=torch.bfloat16, device=DEVICE), post, comb)
    with pytest.raises(ValueError, match="x must be 3-D"):
        hc_post(out, x.flatten(1), post, comb)
