"""The one-token FP8 matrix-vector kernel (kernels/fp8_gemv.py) and its twin against a float64 oracle: weights
decoded by torch's own float8_e4m3fn conversion (every non-NaN byte, subnormals included), activations quantized
by act_quant_torch, products summed in float64 group by group, the SwiGLU by its formula. On CPU through Triton's
interpreter (set in conftest), on a GPU compiled."""

import pytest
import torch

from dsinfer.kernels.fp8 import act_quant_torch, fp8_gemm_torch
from dsinfer.kernels.fp8_gemv import fp8_gemv, fp8_gemv_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16_ULP = 2.0 ** -7            # the interpreter's float32 -> bfloat16 cast truncates


def weight(n, k, g, scale_pow2=True):
    """(n, k) e4m3 from random bytes (the NaN bytes 0x7F / 0xFF left out) and (ceil(n/128), ceil(k/128)) scales."""
    b = torch.randint(0, 254, (n, k), generator=g, dtype=torch.int32)
    b = torch.where(b >= 0x7F, b + 1, b).to(torch.uint8)                           # skip 0x7F, 254 -> 0xFE
    s = torch.rand(-(-n // 128), -(-k // 128), generator=g) + 0.5
    if scale_pow2:
        s = torch.exp2(torch.randint(-12, -4, s.shape, generator=g).float())
    return b.view(torch.float8_e4m3fn), s * 2.0 ** -6


def oracle(x, w, s, quantize, scale_fmt, groups, w3=None, s3=None, limit=0.0):
    """float64: the product (1, N) and sum |a||W| per output (1, N), the scale of its float32 summation error."""
    if quantize:
        q, qs = act_quant_torch(x.view(groups, -1), 128, scale_fmt)
        a = q.double() * qs.double().repeat_interleave(128, dim=-1)[:, :q.shape[1]]
    else:
        a = x.double().view(groups, -1)

    def dequant(w, s):
        full = s.double().repeat_interleave(128, 0)[:w.shape[0]].repeat_interleave(128, 1)[:, :w.shape[1]]
        return w.double() * full
    rows = w.shape[0] // groups

    def product(w, s, f=lambda t: t):
        wd = f(dequant(w, s))
        return torch.cat([f(a[g]) @ wd[g * rows:(g + 1) * rows].T for g in range(groups)])[None]
    y, mag = product(w, s), product(w, s, torch.abs)
    if w3 is not None:
        up = product(w3, s3)
        if limit > 0:
            y, up = y.clamp(max=limit), up.clamp(-limit, limit)
        y = y * torch.sigmoid(y) * up
        mag = torch.full_like(y, (mag.max() * product(w3, s3, torch.abs).max()).item())
    return y, mag


def check(got, want, mag):
    """Within float32 summation error of sum |a||w| and one bf16 step (none when the result stays float32)."""
    ulp = BF16_ULP if got.dtype == torch.bfloat16 else 0.0
    got = got.cpu().double()
    atol = 1e-5 * mag + 1e-30
    assert torch.isfinite(got).all()
    assert ((got - want).abs() <= atol + ulp * want.abs() * 2).all(), (got - want).abs().max()


@pytest.mark.parametrize("n,k", [(1, 128), (130, 200), (256, 1024), (48, 384)])
@pytest.mark.parametrize("quantize,scale_fmt", [(True, None), (True, "ue8m0"), (False, None)])
def test_gemv_equals_the_float64_oracle(n, k, quantize, scale_fmt):
    g = torch.Generator().manual_seed(n * 1000 + k)
    w, s = weight(n, k, g)
    x = (torch.randn(1, k, generator=g) * 4).to(torch.bfloat16)
    x[0, :3] = 0                                                                  # an all-zero-ish group start
    want, mag = oracle(x, w, s, quantize, scale_fmt, 1)
    for fn in (fp8_gemv_torch, fp8_gemv):
        dev = DEVICE if fn is fp8_gemv else "cpu"
        got = fn(x.to(dev), w.to(dev), s.to(dev), quantize=quantize, scale_fmt=scale_fmt)
        assert got.shape == (1, n) and got.dtype == torch.bfloat16
        check(got, want, mag)


def test_quantized_gemv_gives_fp8_gemms_numbers():
    g = torch.Generator().manual_seed(7)
    w, s = weight(300, 640, g, scale_pow2=False)
    x = (torch.randn(1, 640, generator=g) * 2).to(torch.bfloat16)
    want = fp8_gemm_torch(*act_quant_torch(x, 128, "ue8m0"), w, s).float()
    got = fp8_gemv(x.to(DEVICE), w.to(DEVICE), s.to(DEVICE), scale_fmt="ue8m0").cpu().float()
    torch.testing.assert_close(got, want, rtol=2 * BF16_ULP, atol=1e-3 * want.abs().max().item())


@pytest.mark.parametrize("groups,rows,k", [(4, 64, 256), (2, 130, 160), (8, 16, 128)])
def test_grouped_gemv(groups, rows, k):
    g = torch.Generator().manual_seed(groups * rows)
    w, s = weight(groups * rows, k, g)
    x = torch.randn(1, groups * k, generator=g).to(torch.bfloat16)
    want, mag = oracle(x, w, s, False, None, groups)
    for fn in (fp8_gemv_torch, fp8_gemv):
        dev = DEVICE if fn is fp8_gemv else "cpu"
        got = fn(x.to(dev), w.to(dev), s.to(dev), quantize=False, groups=groups)
        check(got, want, mag)


@pytest.mark.parametrize("limit", [0.0, 0.5])
def test_gated_gemv_and_accumulate(limit):
    g = torch.Generator().manual_seed(11)
    w1, s1 = weight(192, 256, g)
    w3, s3 = weight(192, 256, g)
    w2, s2 = weight(256, 192, g)
    x = torch.randn(1, 256, generator=g).to(torch.bfloat16)
    h_want, h_mag = oracle(x, w1, s1, True, None, 1, w3, s3, limit)
    out0 = torch.randn(1, 256, generator=g)
    for fn in (fp8_gemv_torch, fp8_gemv):
        dev = DEVICE if fn is fp8_gemv else "cpu"
        h = fn(x.to(dev), w1.to(dev), s1.to(dev), w3=w3.to(dev), w3_s=s3.to(dev), swiglu_limit=limit)
        assert h.dtype == torch.bfloat16
        check(h, h_want, h_mag)
        out = out0.clone().to(dev)
        assert fn(h, w2.to(dev), s2.to(dev), out=out) is out
        y_want, y_mag = oracle(h.cpu(), w2, s2, True, None, 1)
        check(out.cpu() - out0, y_want, y_mag + 0.1 * out0.abs())


def test_bad_arguments_are_refused():
    g = torch.Generator().manual_seed(0)
    w, s = weight(64, 256, g)
    x = torch.randn(1, 256).to(torch.bfloat16)
    d = DEVICE
    with pytest.raises(ValueError, match="shapes do not agree"):
        fp8_gemv(torch.randn(2, 256).to(torch.bfloat16).to(d), w.to(d), s.to(d))
    with pytest.raises(ValueError, match="groups"):
        fp8_gemv(x.to(d), w.to(d), s.to(d), groups=3)
    with pytest.raises(TypeError, match="w must be"):
        fp8_gemv(x.to(d), w.float().to(d), s.to(d))
    with pytest.raises(ValueError, match="scale_fmt"):
        fp8_gemv(x.to(d), w.to(d), s.to(d), scale_fmt="e5m2")
    with pytest.raises(ValueError, match="multiple of 4"):
        fp8_gemv(x[:, :254].contiguous().to(d), w[:, :254].contiguous().to(d), s.to(d))
    with pytest.raises(ValueError, match="out must be"):
        fp8_gemv(x.to(d), w.to(d), s.to(d), out=torch.zeros(1, 63, device=d))


def test_x_at_any_offset():
    """x is read as 64-bit words: a view that starts mid-word is copied, not misread."""
    g = torch.Generator().manual_seed(5)
    w, s = weight(40, 256, g)
    big = torch.randn(1, 260, generator=g).to(torch.bfloat16)
    x = big[:, 2:258]                                              # 4 bytes past an 8-byte boundary
    want = fp8_gemv_torch(x, w, s).float()
    got = fp8_gemv(x.to(DEVICE) if DEVICE == "cpu" else big.to(DEVICE)[:, 2:258], w.to(DEVICE), s.to(DEVICE))
    torch.testing.assert_close(got.cpu().float(), want, rtol=2 * BF16_ULP, atol=1e-6)


def test_linear_takes_the_gemv_at_one_token_up_to_its_size(monkeypatch):
    """models.layers.linear: one token on the kernels' path runs the GEMV, more tokens or a weight past
    GEMV_MAX_WEIGHTS the FP8 GEMM; both agree with the torch path's numbers."""
    from dsinfer.kernels import fp8_gemv as gemv_module
    from dsinfer.models import layers
    calls = []
    monkeypatch.setattr(layers, "fp8_gemv", lambda *a, **k: calls.append(1) or fp8_gemv(*a, **k))
    g = torch.Generator().manual_seed(9)
    w, s = weight(256, 512, g, scale_pow2=False)
    x = torch.randn(1, 512, generator=g).to(torch.bfloat16)
    want = fp8_gemm_torch(*act_quant_torch(x, 128, "ue8m0"), w, s).float()
    args = (w.to(DEVICE), s.to(DEVICE), (128, 128), "fp8_gemm", "ue8m0")
    got = layers.linear(x.to(DEVICE), *args)
    assert calls == [1]
    monkeypatch.setattr(gemv_module, "GEMV_MAX_WEIGHTS", 256 * 512 - 1)
    big = layers.linear(x.to(DEVICE), *args)
    two = layers.linear(torch.cat([x, x]).to(DEVICE), *args)
    assert calls == [1]
    for y in (got, big, two[:1]):
        torch.testing.assert_close(y.cpu().float(), want, rtol=2 * BF16_ULP, atol=2e-2 * want.abs().max().item())
