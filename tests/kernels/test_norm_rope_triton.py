"""The fused RMSNorm and rotary kernels against their PyTorch twins (Triton's interpreter on CPU)."""

import pytest
import torch

from dsinfer.kernels.norm_rope_triton import add_rms_norm, add_rms_norm_torch, rms_norm, rms_norm_torch, rotary
from dsinfer.models.rope import apply_rotary

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16 if DEVICE == "cuda" else torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (5, 72), (3, 2, 512), (0, 16)])
def test_rms_norm_equals_twin(shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(DEVICE, dtype)
    w = torch.rand(shape[-1], generator=g).to(DEVICE)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_torch(x, w, 1e-6), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (5, 72), (3, 2048), (0, 16)])
def test_add_rms_norm_equals_twin(shape, dtype):
    """The residual sum is the unfused add's (rounded once to the dtype: exactly equal); the norm is of it."""
    g = torch.Generator().manual_seed(1)
    x, r = ((torch.randn(shape, generator=g) * 3).to(DEVICE, dtype) for _ in range(2))
    w = torch.rand(shape[-1], generator=g).to(DEVICE)
    y, h = add_rms_norm(x, r, w, 1e-6)
    want_y, want_h = add_rms_norm_torch(x, r, w, 1e-6)
    assert torch.equal(h, want_h) and h.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y, want_y, atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="one dtype"):
        add_rms_norm(x, r.float() if dtype != torch.float32 else r.half(), w, 1e-6)


def test_rms_norm_of_a_strided_view():
    x = torch.randn(4, 96, device=DEVICE)[:, 16:80]              # rows 96 apart, 64 wide
    w = torch.rand(64, device=DEVICE)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_torch(x, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,d", [(1, 1, 64), (7, 16, 64), (3, 5, 8), (3, 20, 8), (2, 128, 64)])
@pytest.mark.parametrize("view", [False, True])
def test_rotary_equals_twin(T, H, d, dtype, view):
    g = torch.Generator().manual_seed(1)
    full = torch.randn(T, H, 24 + d, generator=g).to(DEVICE, dtype)
    x = full[..., 24:] if view else full[..., :d].contiguous()  # q_pe is a slice of the query in MLA
    cos_sin = torch.randn(T, d // 2, 2, generator=g).to(DEVICE)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(rotary(x, cos_sin), apply_rotary(x, cos_sin), atol=tol, rtol=tol)
    k = x[:, 0]                                                  # (T, d): the shared rotary key
    torch.testing.assert_close(rotary(k, cos_sin), apply_rotary(k.unsqueeze(1), cos_sin).squeeze(1), atol=tol,
                               rtol=tol)
