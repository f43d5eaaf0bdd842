"""FP8 block-scaled weights: dequantization, quantization and the scale-shape check.

Oracle: a plain python loop over blocks written here (dequant: w[block] * s[block]; quant: amax / 448 per block),
and the e4m3 rounding bound for the quantize -> dequantize round trip.
"""

import math

import pytest
import torch

from dsinfer.kernels.fp8 import FP8_MAX, check_block_scale, weight_dequant_torch, weight_quant_torch

SHAPES = [(1, 1), (1, 300), (130, 200), (257, 129), (128, 128), (300, 260), (64, 32)]
BLOCKS = [(128, 128), (64, 32)]


def blocks_of(n: int, k: int, block_size):
    """Yield (i, j, row slice, column slice) of every (possibly partial) block."""
    bn, bk = block_size
    for i in range(math.ceil(n / bn)):
        for j in range(math.ceil(k / bk)):
            yield i, j, slice(i * bn, min((i + 1) * bn, n)), slice(j * bk, min((j + 1) * bk, k))


def random_weight(n: int, k: int, seed: int) -> torch.Tensor:
    """Gaussian weight whose rows span several orders of magnitude, so blocks get very different scales."""
    g = torch.Generator().manual_seed(seed)
    row_scale = 10.0 ** torch.randint(-4, 3, (n, 1), generator=g).float()
    return torch.randn(n, k, generator=g) * row_scale


def reference_dequant(w: torch.Tensor, s: torch.Tensor, block_size) -> torch.Tensor:
    out = torch.empty(w.shape, dtype=torch.float32)
    for i, j, rows, cols in blocks_of(*w.shape, block_size):
        out[rows, cols] = w[rows, cols].float() * s[i, j].item()
    return out


def reference_scales(w: torch.Tensor, block_size) -> torch.Tensor:
    bn, bk = block_size
    s = torch.empty(math.ceil(w.shape[0] / bn), math.ceil(w.shape[1] / bk))
    for i, j, rows, cols in blocks_of(*w.shape, block_size):
        s[i, j] = max(w[rows, cols].float().abs().max().item(), 1e-4) / FP8_MAX
    return s


# -- dequant ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("block_size", BLOCKS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_dequant_matches_block_loop(shape, block_size, dtype):
    n, k = shape
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = (torch.randn(n, k, generator=g) * 100).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    s = torch.rand(math.ceil(n / block_size[0]), math.ceil(k / block_size[1]), generator=g) * 1e-2 + 1e-4
    out = weight_dequant_torch(w, s, block_size, dtype)
    assert out.dtype == dtype and out.shape == shape
    # each element is one float32 product, so float32 agrees exactly and other dtypes are that product rounded
    assert torch.equal(out, reference_dequant(w, s, block_size).to(dtype))


def test_weight_dequant_distinct_scale_per_block():
    """Every block has its own scale (a transposed or shifted scale grid would fail here)."""
    w = torch.ones(5, 7).to(torch.float8_e4m3fn)
    s = torch.arange(1, 13, dtype=torch.float32).view(3, 4)            # 2x2 blocks, ragged last row/column
    out = weight_dequant_torch(w, s, (2, 2), torch.float32)
    for i in range(5):
        for j in range(7):
            assert out[i, j].item() == s[i // 2, j // 2].item()


# -- quant -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("block_size", BLOCKS, ids=str)
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_quant_round_trip(shape, block_size, scale_fmt, in_dtype):
    n, k = shape
    w = random_weight(n, k, seed=n + k).to(in_dtype)
    q, s = weight_quant_torch(w, block_size, scale_fmt)
    assert q.dtype == torch.float8_e4m3fn and q.shape == shape
    assert s.dtype == torch.float32 and s.shape == (math.ceil(n / block_size[0]), math.ceil(k / block_size[1]))
    plain = reference_scales(w, block_size)
    if scale_fmt is None:
        torch.testing.assert_close(s, plain, rtol=1e-6, atol=0)
    else:
        # ue8m0: the smallest power of two >= amax / 448
        assert torch.equal(s, torch.exp2(torch.round(torch.log2(s))))
        assert (s >= plain * (1 - 1e-6)).all() and (s < 2 * plain).all()
    # Round-trip bound. e4m3fn has 3 mantissa bits: normal values (|x| >= 2^-6) lie on a grid of spacing
    # 2^(e-3) for |x| in [2^e, 2^(e+1)), so round-to-nearest errs by at most 2^(e-4) <= |x| * 2^-4; subnormals
    # (|x| < 2^-6) lie on a grid of spacing 2^-9, error <= 2^-10. In weight units (x = W / scale) that is
    #     |W - dequant(quant(W))| <= max(|W| * 2^-4, scale * 2^-10)        per element,
    # and no clamping error since every |W| / scale <= 448. A small relative slack covers float32 rounding.
    w32 = w.float()
    deq = weight_dequant_torch(q, s, block_size, torch.float32)
    for i, j, rows, cols in blocks_of(n, k, block_size):
        err = (deq[rows, cols] - w32[rows, cols]).abs()
        bound = torch.maximum(w32[rows, cols].abs() * 2**-4, torch.tensor(s[i, j].item() * 2**-10))
        assert (err <= bound * (1 + 1e-5)).all(), (i, j, (err - bound).max().item())
        # the block's largest element maps to the top of the fp8 range (exactly 448 with plain scales)
        top = (q[rows, cols].float().abs().max()).item()
        assert top <= FP8_MAX and (scale_fmt is not None or top == FP8_MAX or w32[rows, cols].abs().max() < 1e-4)


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_weight_quant_zero_blocks(scale_fmt):
    w = random_weight(200, 100, seed=3)
    w[:128, :64] = 0                         # a whole zero block
    w[128:, 64:] = 0                         # a zero ragged edge block
    w[0:128, 64:100] = 1e-7                  # a tiny block below the amax clamp
    q, s = weight_quant_torch(w, (128, 64), scale_fmt)
    deq = weight_dequant_torch(q, s, (128, 64), torch.float32)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert not torch.isnan(q.float()).any() and not torch.isnan(deq).any()
    assert (deq[:128, :64] == 0).all() and (deq[128:, 64:] == 0).all()
    if scale_fmt is None:
        assert s[0, 0].item() == pytest.approx(1e-4 / FP8_MAX) and s[1, 1].item() == pytest.approx(1e-4 / FP8_MAX)
    torch.testing.assert_close(deq[0:128, 64:100], w[0:128, 64:100], rtol=2**-4, atol=s[0, 1].item() * 2**-10)


# -- scale shape check -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("w_shape,s_shape,block_size", [
    ((256, 256), (2, 2), (128, 128)),
    ((257, 129), (3, 2), (128, 128)),
    ((1, 1), (1, 1), (128, 128)),
    ((130, 200), (3, 7), (64, 32)),
])
def test_check_block_scale_accepts_ceil_grid(w_shape, s_shape, block_size):
    check_block_scale(torch.zeros(w_shape), torch.ones(s_shape), block_size)


@pytest.mark.parametrize("w_shape,s_shape,block_size", [
    ((256, 256), (2, 3), (128, 128)),
    ((257, 129), (2, 1), (128, 128)),          # floor instead of ceil
    ((257, 129), (2, 3), (128, 128)),          # transposed
    ((130, 200), (7, 3), (64, 32)),            # transposed
    ((128, 128), (1,), (128, 128)),            # 1-D scale
    ((128, 128), (1, 1, 1), (128, 128)),       # 3-D scale
])
def test_check_block_scale_rejects_wrong_shape(w_shape, s_shape, block_size):
    w, s = torch.zeros(w_shape), torch.ones(s_shape)
    with pytest.raises(ValueError):
        check_block_scale(w, s, block_size)
    with pytest.raises(ValueError):
        weight_dequant_torch(w.to(torch.float8_e4m3fn), s, block_size)


def test_weight_quant_rejects_non_2d():
    with pytest.raises(ValueError):
        weight_quant_torch(torch.zeros(4, 4, 4))
    with pytest.raises(ValueError):
        weight_quant_torch(torch.zeros(16))
