"""V4 attention's per-head epilogues (kernels/v4_rope.py): the twin against complex-number rotation and a plain
norm written here, and the Triton kernel (Triton's interpreter on CPU) against the twin. Grids cross head widths
that are not powers of two, one and many heads, the norm, the FP8 rounding and the inverse rotation."""

import pytest
import torch

from dsinfer.kernels.fp4 import fp8_act_quant_dequant_torch
from dsinfer.kernels.v4_rope import head_rope, head_rope_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def case(T, H, d, rd, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(T, H, d, generator=g)).to(dtype)
    angles = torch.rand(T, rd // 2, generator=g, dtype=torch.float64) * 6.28
    return x, torch.stack([angles.cos(), angles.sin()], -1).float()


def reference(x, cos_sin, rd, eps, qat, inverse):
    """Rotation as a complex product (x[2i] + i x[2i+1]) * e^(+-i angle), in float64 after the same roundings."""
    if eps is not None:
        x = (x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype))
    z = torch.view_as_complex(x[..., -rd:].double().reshape(*x.shape[:-1], rd // 2, 2).contiguous())
    w = torch.view_as_complex(cos_sin.double().contiguous())
    w = w.conj() if inverse else w
    rot = torch.view_as_real(z * w.unsqueeze(1)).flatten(-2)
    rest = fp8_act_quant_dequant_torch(x[..., :-rd], qat) if qat else x[..., :-rd]
    return torch.cat([rest.double(), rot], -1)


PARAMS = [(None, 0, False), (1e-6, 0, False), (None, 64, False), (None, 0, True), (1e-6, 64, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps,qat,inverse", PARAMS)
def test_twin_equals_complex_rotation(eps, qat, inverse, dtype):
    x, cs = case(3, 2, 192, 64, dtype)
    got = head_rope_torch(x, cs, 64, eps=eps, qat_block=qat, inverse=inverse)
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(got.double(), reference(x, cs, 64, eps, qat, inverse), rtol=tol, atol=tol)
    if qat:   # the unrotated part lands on the e4m3 grid times a power of two: it changed, and rounds again to itself
        rest = got[..., :-64]
        assert not torch.equal(rest, x[..., :-64]) or eps is not None
        torch.testing.assert_close(fp8_act_quant_dequant_torch(rest, qat), rest, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps,qat,inverse", PARAMS)
@pytest.mark.parametrize("T,H,d,rd", [(1, 1, 192, 64), (2, 3, 96, 32), (1, 64, 512, 64), (3, 5, 80, 16)])
def test_kernel_equals_twin(T, H, d, rd, eps, qat, inverse, dtype):
    pytest.importorskip("triton")
    if qat and (d - rd) % qat:
        qat = 16
    x, cs = case(T, H, d, rd, dtype, seed=1)
    want = head_rope_torch(x, cs, rd, eps=eps, qat_block=qat, inverse=inverse)
    got = head_rope(x.to(DEVICE), cs.to(DEVICE), rd, eps=eps, qat_block=qat, inverse=inverse).cpu()
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:   # the rotation's float32 products may round to the neighbouring bf16 value
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-5)
    two_d = head_rope(x[:, 0].contiguous().to(DEVICE), cs.to(DEVICE), rd, eps=eps, qat_block=qat, inverse=inverse).cpu()
    exact = dtype != torch.float32   # compiled float32 may contract a product into an FMA differently per layout
    torch.testing.assert_close(two_d, got[:, 0], **({"rtol": 0, "atol": 0} if exact else {}))


def test_kernel_checks_its_arguments():
    x, cs = (t.to(DEVICE) for t in case(2, 2, 96, 32, torch.bfloat16))
    with pytest.raises(ValueError, match="rope_dim 33 must be even"):
        head_rope(x, cs, 33)
    with pytest.raises(ValueError, match=r"cos_sin \(2, 16, 2\); got cos_sin \(2, 8, 2\)"):
        head_rope(x, cs[:, :8].contiguous(), 32)
    with pytest.raises(ValueError, match="qat_block 48 must be a power of two dividing the 64 unrotated dims"):
        head_rope(x, cs, 32, qat_block=48)
    with pytest.raises(TypeError, match="cos_sin must be float32"):
        head_rope(x, cs.double(), 32)
    with pytest.raises(ValueError, match=r"x must be \(T, H, d\) or \(T, d\)"):
        head_rope(x[None], cs, 32)
