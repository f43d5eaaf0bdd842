"""DeepSeek-V4 sparse attention with a sink: the Triton kernel (Triton's interpreter on CPU) against its PyTorch
twin, and the twin against a plain loop over tokens and heads. Grids cross ragged head blocks (H not a multiple
of 16), head dims that are not powers of two, K across index blocks, skipped (-1) indices and a token with none,
and few tokens with many indices, which the kernel splits into ranges merged by log-sum-exp."""

import pytest
import torch

from dsinfer.kernels.v4_sparse_attention import sparse_attention, sparse_attention_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"     # CPU: Triton's interpreter (set in conftest)


def case(T, H, D, K, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, D, generator=g).to(dtype)
    kv = torch.randn(N, D, generator=g).to(dtype)
    idx = torch.randint(0, N, (T, K), generator=g, dtype=torch.int32)
    idx[torch.rand(T, K, generator=g) < 0.3] = -1
    idx[-1, :] = -1 if T > 1 else idx[-1, :]                   # the last token (of several) sees nothing
    sink = torch.randn(H, generator=g) * 2
    return q, kv, idx, sink


def loop_reference(q, kv, idx, sink, scale):
    T, H, D = q.shape
    out = torch.zeros(T, H, D, dtype=torch.float64)
    for t in range(T):
        rows = kv[idx[t][idx[t] >= 0].long()].double()
        for h in range(H):
            logits = rows @ q[t, h].double() * scale
            w = torch.exp(torch.cat([logits, sink[h:h + 1].double()]))
            out[t, h] = (w[:-1, None] * rows).sum(0) / w.sum()
    return out


@pytest.mark.parametrize("T,H,D,K,N", [(1, 4, 64, 1, 3), (3, 20, 96, 40, 50), (2, 16, 128, 70, 200)])
def test_twin_equals_a_plain_loop(T, H, D, K, N):
    q, kv, idx, sink = case(T, H, D, K, N, torch.float32)
    got = sparse_attention_torch(q, kv, idx, sink, D ** -0.5)
    assert torch.allclose(got.double(), loop_reference(q, kv, idx, sink, D ** -0.5), atol=1e-5)
    if T > 1:
        assert torch.equal(got[-1], torch.zeros_like(got[-1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,H,D,K,N", [(1, 4, 64, 1, 3), (3, 20, 96, 40, 50), (2, 16, 128, 70, 200),
                                       (1, 20, 96, 300, 400), (2, 16, 320, 130, 150)])   # split into ranges
def test_kernel_equals_twin(T, H, D, K, N, dtype):
    pytest.importorskip("triton")
    q, kv, idx, sink = case(T, H, D, K, N, dtype, seed=1)
    want = sparse_attention_torch(q, kv, idx, sink, D ** -0.5)
    got = sparse_attention(q.to(DEVICE), kv.to(DEVICE), idx.to(DEVICE), sink.to(DEVICE), D ** -0.5).cpu()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)


def test_kernel_checks_its_arguments():
    q, kv, idx, sink = (t.to(DEVICE) for t in case(2, 4, 64, 8, 10, torch.float32))
    with pytest.raises(TypeError, match="indices must be int32"):
        sparse_attention(q, kv, idx.long(), sink, 0.1)
    with pytest.raises(ValueError, match="shapes do not agree"):
        sparse_attention(q, kv[:, :32].contiguous(), idx, sink, 0.1)
