"""The V4 low-precision formats against plain bit-level decoders written here: E8M0 scales, FP4 e2m1 packed
weights, FP8 e4m3 with E8M0 block scales, and the QAT round trips against a brute-force nearest-value search."""

import math

import pytest
import torch

from dsinfer.kernels.fp4 import (
    e8m0_to_float,
    fp4_act_quant_dequant_torch,
    fp4_dequant_torch,
    fp4_to_fp8_torch,
    fp4_unpack,
    fp8_act_quant_dequant_torch,
    fp8_e8m0_dequant_torch,
)


def e8m0_bits(b: int) -> float:
    return math.nan if b == 0xFF else 2.0 ** (b - 127)


def e2m1_bits(code: int) -> float:
    sign, exp, man = code >> 3, (code >> 1) & 3, code & 1
    mag = man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1 + man / 2)
    return -mag if sign else mag


def e4m3_bits(b: int) -> float:
    sign, exp, man = b >> 7, (b >> 3) & 15, b & 7
    if exp == 15 and man == 7:
        return math.nan
    mag = man / 8 * 2.0 ** -6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)
    return -mag if sign else mag


def test_e8m0_every_byte():
    b = torch.arange(256, dtype=torch.uint8)
    want = torch.tensor([e8m0_bits(i) for i in range(256)], dtype=torch.float32)
    for s in (b, b.view(torch.float8_e8m0fnu)):
        got = e8m0_to_float(s)
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got[:255], want[:255])


def test_fp4_unpack_every_byte():
    b = torch.arange(256, dtype=torch.uint8).view(torch.int8)
    want = torch.tensor([[e2m1_bits(i & 15), e2m1_bits(i >> 4)] for i in range(256)]).flatten()
    assert torch.equal(fp4_unpack(b), want)


@pytest.mark.parametrize("n,k", [(1, 32), (3, 64), (7, 256)])
@pytest.mark.parametrize("scale_dtype", [torch.uint8, torch.float8_e8m0fnu])
def test_fp4_dequant_matches_bit_decoder(n, k, scale_dtype):
    g = torch.Generator().manual_seed(n * k)
    packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    exps = torch.randint(110, 140, (n, k // 32), generator=g, dtype=torch.uint8)
    got = fp4_dequant_torch(packed.view(torch.int8), exps.view(scale_dtype), torch.float32)
    want = torch.empty(n, k)
    for i in range(n):
        for j in range(k):
            byte = int(packed[i, j // 2])
            code = byte & 15 if j % 2 == 0 else byte >> 4
            want[i, j] = e2m1_bits(code) * e8m0_bits(int(exps[i, j // 32]))
    assert torch.equal(got, want)


@pytest.mark.parametrize("n,k", [(1, 1), (128, 128), (130, 200)])
def test_fp8_e8m0_dequant_matches_bit_decoder(n, k):
    g = torch.Generator().manual_seed(n + k)
    bits = torch.randint(0, 256, (n, k), generator=g, dtype=torch.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x11                              # no NaN codes
    exps = torch.randint(100, 130, (-(-n // 128), -(-k // 128)), generator=g, dtype=torch.uint8)
    got = fp8_e8m0_dequant_torch(bits.view(torch.float8_e4m3fn), exps.view(torch.float8_e8m0fnu),
                                 dtype=torch.float32)
    want = torch.tensor([[e4m3_bits(int(bits[i, j])) * e8m0_bits(int(exps[i // 128, j // 128]))
                          for j in range(k)] for i in range(n)])
    assert torch.equal(got, want)


def fp4_qat_reference(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Brute force: scale 2^ceil(log2(amax / 6)); nearest e2m1 value, ties to the even code."""
    grid = [e2m1_bits(c) for c in range(16)]
    out = torch.empty_like(x)
    flat, res = x.reshape(-1, block), out.view(-1, block)
    for r in range(flat.shape[0]):
        amax = max(flat[r].abs().max().item(), 6 * 2.0 ** -126)
        s = 2.0 ** math.ceil(math.log2(amax / 6))
        for c in range(block):
            v = min(max(flat[r, c].item() / s, -6.0), 6.0)
            best = min(range(16), key=lambda code: (abs(grid[code] - v), code & 1, code))
            res[r, c] = grid[best] * s
    return out


@pytest.mark.parametrize("shape", [(1, 32), (5, 64), (2, 3, 128)])
def test_fp4_act_round_trip_matches_brute_force(shape):
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=g) * torch.rand(shape, generator=g) * 10
    assert torch.equal(fp4_act_quant_dequant_torch(x), fp4_qat_reference(x))


def test_fp4_round_trip_ties_and_zeros():
    # amax 6 -> scale 1: every midpoint between grid values is a tie, resolved to the even code.
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -2.5, -5.0, 6.0] + [0.0] * 21)
    assert torch.equal(fp4_act_quant_dequant_torch(ties), fp4_qat_reference(ties))
    assert torch.equal(fp4_act_quant_dequant_torch(ties)[:10],
                       torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -2.0, -4.0]))
    assert torch.equal(fp4_act_quant_dequant_torch(torch.zeros(2, 32)), torch.zeros(2, 32))
    with pytest.raises(ValueError, match="multiple of 32"):
        fp4_act_quant_dequant_torch(torch.ones(48))


@pytest.mark.parametrize("k", [64, 192])
def test_fp8_act_round_trip_is_e4m3_times_power_of_two(k):
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(k)) * 3
    y = fp8_act_quant_dequant_torch(x, 64)
    for blk in range(k // 64):
        xb, yb = x[:, blk * 64:(blk + 1) * 64], y[:, blk * 64:(blk + 1) * 64]
        s = torch.exp2(torch.ceil(torch.log2(xb.abs().amax(-1, keepdim=True) / 448)))
        codes = (yb / s)
        assert torch.equal(codes.to(torch.float8_e4m3fn).float(), codes)        # exactly representable
        assert ((yb - xb).abs() <= s * 2.0 ** -4 * xb.abs().div(s).clamp(min=2.0 ** -6) + 1e-12).all()


@pytest.mark.parametrize("n,k,block", [(128, 128, (128, 128)), (256, 512, (128, 128)), (200, 160, (128, 128)),
                                       (64, 96, (32, 64))])
def test_fp4_to_fp8_is_exact_with_the_reference_tile_scale(n, k, block):
    """Every value of the FP8 repacking, decoded bit by bit, equals the FP4 value; a tile's scale is its largest
    32-input scale over 2^6 (edge tiles included); no e4m3 code exceeds 384."""
    g = torch.Generator().manual_seed(n + k)
    packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    scale = torch.randint(114, 129, (n, k // 32), generator=g, dtype=torch.uint8)   # spans 2^14: exact
    q, s = fp4_to_fp8_torch(packed.view(torch.int8), scale.view(torch.float8_e8m0fnu), block)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.uint8
    assert s.shape == (-(-n // block[0]), -(-k // block[1]))
    e4m3 = torch.tensor([e4m3_bits(b) for b in range(256)], dtype=torch.float64)
    e2m1 = torch.tensor([e2m1_bits(c) for c in range(16)], dtype=torch.float64)
    b = packed.long()
    fp4 = e2m1[torch.stack([b & 15, b >> 4], -1).flatten(-2)] * \
        torch.exp2(scale.double() - 127).repeat_interleave(32, -1)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            sub = scale[rows, j * block[1] // 32:(j + 1) * block[1] // 32]
            assert int(s[i, j]) == int(sub.max()) - 6
            codes = e4m3[q[rows, cols].view(torch.uint8).long()]
            assert codes.abs().max() <= 384
            assert torch.equal(codes * e8m0_bits(int(s[i, j])), fp4[rows, cols])


def test_fp4_to_fp8_refuses_to_lose_values():
    packed = torch.full((128, 64), 0x11, dtype=torch.uint8)            # every value 0.5 * its scale
    scale = torch.full((128, 4), 120, dtype=torch.uint8)
    scale[0, 0] = 140                                                   # 2^20 above the rest of the tile
    with pytest.raises(ValueError, match="cast to bf16 instead"):
        fp4_to_fp8_torch(packed, scale)
    scale[0, 0] = 133                                                   # 2^13: still exact
    q, s = fp4_to_fp8_torch(packed, scale)
    assert int(s[0, 0]) == 127 and torch.equal(fp8_e8m0_dequant_torch(q, s, dtype=torch.float32),
                                               fp4_dequant_torch(packed, scale, torch.float32))
