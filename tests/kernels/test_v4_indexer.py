"""The DeepSeek-V4 lightning indexer's scoring and top-k: the twins against a plain float64 loop over queries, entries
and heads and against the model's own Indexer.forward; the Triton kernel (Triton's interpreter on CPU) against the
twins. Grids cross odd head counts, head dims that are not powers of two, n across key blocks (64), a visible
prefix that ends exactly on a block boundary, queries that see no entry and queries whose limit passes n."""

import pytest
import torch

from dsinfer.kernels.v4_indexer import (
    indexer_scores,
    indexer_scores_rows,
    indexer_scores_rows_torch,
    indexer_scores_torch,
    indexer_topk,
    indexer_topk_torch,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"     # CPU: Triton's interpreter (set in conftest)
RATIO = 4


def case(S, H, d, n, dtype, seed=0):
    """Random q, keys, w and positions; with ratio 4 the five positions see 0, 1, 37, 64 (a block boundary) and
    all n entries (their limit passes n); a lone query sees n - 1 (none when n == 1)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(S, H, d, generator=g).to(dtype)
    keys = torch.randn(n, d, generator=g).to(dtype)
    w = torch.randn(S, H, generator=g) * (H * d) ** -0.5
    if S == 1:
        positions = torch.tensor([max(0, RATIO * n - 5)])
    else:
        positions = torch.tensor([0, 3, 4 * 37 - 1, 4 * 64 - 1, 4 * n + 10][:S] + list(range(S - 5)))
    return q, keys, w, positions


def loop_reference(q, keys, w, positions, ratio):
    """I[s, t] = sum_h w[s, h] * relu(q[s, h] . keys[t]) in float64, -inf for t >= (p + 1) // ratio."""
    S, H, _ = q.shape
    n = keys.shape[0]
    out = torch.full((S, n), float("-inf"), dtype=torch.float64)
    for s in range(S):
        limit = (int(positions[s]) + 1) // ratio
        for t in range(min(n, limit)):
            out[s, t] = sum(float(w[s, h]) * max(0.0, float(q[s, h].double() @ keys[t].double())) for h in range(H))
    return out


def check_topk(top, scores, positions, ratio, k):
    """top (S, k) picks the k best of `scores` (S, n) a query may see, best first, -1 after its visible count."""
    n = scores.shape[1]
    assert top.dtype == torch.int64 and top.shape == (scores.shape[0], k)
    for s in range(top.shape[0]):
        seen = min(n, max(0, (int(positions[s]) + 1) // ratio))
        picked = top[s, :min(k, seen)]
        assert torch.equal(top[s] == -1, torch.arange(k) >= seen)
        assert picked.unique().numel() == picked.numel() and bool((picked < seen).all())
        best = scores[s, :seen].sort(descending=True).values[:k]
        torch.testing.assert_close(scores[s, picked].sort(descending=True).values, best, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("S,H,d,n", [(1, 4, 32, 1), (5, 3, 48, 17), (5, 4, 32, 70)])
def test_twins_equal_a_plain_loop(S, H, d, n):
    q, keys, w, positions = case(S, H, d, n, torch.float32)
    want = loop_reference(q, keys, w, positions, RATIO)
    got = indexer_scores_torch(q, keys, w, positions, RATIO)
    assert got.dtype == torch.float32 and got.shape == (S, n)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)     # -inf exactly where hidden
    for k in (1, 4, 100):
        check_topk(indexer_topk_torch(q, keys, w, positions, RATIO, k), want, positions, RATIO, min(k, n))


@pytest.mark.parametrize("simulate_qat", [False, True])
def test_twin_equals_the_models_indexer(monkeypatch, simulate_qat):
    """Indexer.forward of a tiny V4 config on a prefill and a continuation chunk: the twin, fed the q, keys and w
    that the model computes, returns the model's indices exactly."""
    import fixtures

    import dsinfer.models.v4_indexer as v4_indexer
    from dsinfer.models.args_v4 import ModelArgsV4
    from dsinfer.models.rope import rope_cos_sin
    from dsinfer.models.v4_state import CompressorState

    args = ModelArgsV4.from_hf_config(dict(fixtures.V4, model_type="deepseek_v4"))
    indexer = v4_indexer.Indexer(args, RATIO)
    g = torch.Generator().manual_seed(0)
    for p in indexer.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.1
    seen = {}

    def record(name, fn):
        def wrapped(*a, **kw):
            seen[name] = fn(*a, **kw)
            return seen[name]
        return wrapped

    # the indexer's final q: hadamard's output, or the FP4 rounding's after it (the compressor's own calls are
    # to its module's names, not these)
    monkeypatch.setattr(v4_indexer, "hadamard", record("q", v4_indexer.hadamard))
    monkeypatch.setattr(v4_indexer, "fp4_act_quant_dequant_torch", record("q", v4_indexer.fp4_act_quant_dequant_torch))
    indexer.compressor.register_forward_hook(lambda m, i, o: seen.__setitem__("keys", o))
    indexer.weights_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("w", o))
    rope_table = rope_cos_sin(args.compress_rope, args.rope_head_dim, 64)
    state = CompressorState()
    start = 0
    for S in (30, 9):
        x, qr = torch.randn(S, args.dim, generator=g), torch.randn(S, args.q_lora_rank, generator=g)
        want = indexer(x, qr, start, state, rope_table, simulate_qat)
        positions = torch.arange(start, start + S)
        w = seen["w"].float() * (args.index_head_dim * args.index_n_heads) ** -0.5
        got = indexer_topk_torch(seen["q"], seen["keys"], w, positions, RATIO, args.index_topk)
        assert want.shape[1] == args.index_topk < seen["keys"].shape[0]
        assert torch.equal(got, want)
        scores = indexer_scores_torch(seen["q"], seen["keys"], w, positions, RATIO)
        on = [t.to(DEVICE) for t in (seen["q"], seen["keys"], w, positions)]
        check_topk(indexer_topk(*on, RATIO, args.index_topk).cpu(), scores, positions, RATIO, args.index_topk)
        start += S


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 17, 70])
@pytest.mark.parametrize("d", [32, 48])
@pytest.mark.parametrize("H", [4, 3])
@pytest.mark.parametrize("S", [1, 5])
def test_scores_kernel_equals_twin(S, H, d, n, dtype):
    pytest.importorskip("triton")
    q, keys, w, positions = case(S, H, d, n, dtype, seed=1)
    want = indexer_scores_torch(q, keys, w, positions, RATIO)
    got = indexer_scores(q.to(DEVICE), keys.to(DEVICE), w.to(DEVICE), positions.to(DEVICE), RATIO).cpu()
    assert got.dtype == torch.float32 and got.shape == (S, n)
    assert torch.equal(got.isneginf(), want.isneginf())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 4, 100])
@pytest.mark.parametrize("S,H,d,n,dtype", [(5, 3, 48, 70, torch.float32), (5, 4, 32, 17, torch.bfloat16),
                                           (1, 4, 32, 1, torch.float32)])
def test_topk_kernel_picks_the_twins_scores(S, H, d, n, dtype, k):
    pytest.importorskip("triton")
    q, keys, w, positions = case(S, H, d, n, dtype, seed=2)
    scores = indexer_scores_torch(q, keys, w, positions, RATIO)
    want = indexer_topk_torch(q, keys, w, positions, RATIO, k)
    got = indexer_topk(q.to(DEVICE), keys.to(DEVICE), w.to(DEVICE), positions.to(DEVICE), RATIO, k).cpu()
    assert torch.equal(got == -1, want == -1)
    check_topk(got, scores, positions, RATIO, min(k, n))


def rows_case(B, H, d, E, dtype, seed):
    """B queries, each with its own E entries scattered among one keys tensor (shared rows too), at positions that
    see 0, 1, a block boundary's worth (64), all E and more; rows past a query's visible entries hold garbage."""
    g = torch.Generator().manual_seed(seed)
    N = 3 * E + 5
    q = torch.randn(B, H, d, generator=g).to(dtype)
    keys = torch.randn(N, d, generator=g).to(dtype)
    w = torch.randn(B, H, generator=g) * (H * d) ** -0.5
    rows = torch.stack([torch.randperm(N, generator=g)[:E] for _ in range(B)])
    positions = torch.tensor([0, 7, 4 * 64 - 1, 4 * E - 1, 4 * E + 9][:B])
    limit = (positions + 1) // RATIO
    rows = torch.where(torch.arange(E)[None] < limit[:, None], rows, 10**9)          # never read where hidden
    return q, keys, rows, w, positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,d,E", [(1, 4, 32, 1), (5, 3, 48, 17), (5, 4, 32, 70)])
def test_rows_twin_and_kernel_equal_each_rows_own_scores(B, H, d, E, dtype):
    """Row b's scores equal the plain scores of query b over its own gathered keys (the loop reference on them);
    the kernel equals the twin."""
    q, keys, rows, w, positions = rows_case(B, H, d, E, dtype, seed=3)
    want = torch.full((B, E), float("-inf"), dtype=torch.float64)
    for b in range(B):
        seen = min(E, (int(positions[b]) + 1) // RATIO)
        want[b, :seen] = loop_reference(q[b:b + 1], keys[rows[b, :seen]], w[b:b + 1], positions[b:b + 1], RATIO)[0]
    twin = indexer_scores_rows_torch(q, keys, rows, w, positions, RATIO)
    assert twin.dtype == torch.float32 and twin.shape == (B, E)
    torch.testing.assert_close(twin.double(), want, atol=1e-5, rtol=1e-5)
    pytest.importorskip("triton")
    got = indexer_scores_rows(*(t.to(DEVICE) for t in (q, keys, rows, w, positions)), RATIO).cpu()
    assert torch.equal(got.isneginf(), twin.isneginf())
    torch.testing.assert_close(got, twin, atol=1e-5, rtol=1e-5)


def test_rows_kernel_checks_its_rows():
    q, keys, rows, w, positions = (t.to(DEVICE) for t in rows_case(5, 4, 32, 17, torch.float32, seed=4))
    with pytest.raises(TypeError, match="rows must be int64; got int32"):
        indexer_scores_rows(q, keys, rows.int(), w, positions, RATIO)
    with pytest.raises(ValueError, match="needs one row"):
        indexer_scores_rows(q, keys, rows[:4].contiguous(), w, positions, RATIO)


@pytest.mark.parametrize("S,n", [(3, 0), (0, 5), (0, 0)])
def test_empty(S, n):
    q, keys, w, positions = case(max(S, 1), 4, 32, n, torch.float32)
    q, w, positions = q[:S], w[:S], positions[:S]
    for scores in (indexer_scores_torch(q, keys, w, positions, RATIO),
                   indexer_scores(q.to(DEVICE), keys.to(DEVICE), w.to(DEVICE), positions.to(DEVICE), RATIO)):
        assert scores.shape == (S, n) and scores.dtype == torch.float32
    for top in (indexer_topk_torch(q, keys, w, positions, RATIO, 4),
                indexer_topk(q.to(DEVICE), keys.to(DEVICE), w.to(DEVICE), positions.to(DEVICE), RATIO, 4)):
        assert top.shape == (S, min(4, n)) and top.dtype == torch.int64


def test_kernel_checks_its_arguments():
    q, keys, w, positions = (t.to(DEVICE) for t in case(5, 4, 32, 17, torch.float32))
    bad = [
        (TypeError, "q must be float32, float16, bfloat16; got int64", (q.long(), keys, w, positions, RATIO)),
        (TypeError, "keys must be float32; got bfloat16", (q, keys.bfloat16(), w, positions, RATIO)),
        (TypeError, "w must be float32; got bfloat16", (q, keys, w.bfloat16(), positions, RATIO)),
        (TypeError, "positions must be int64; got int32", (q, keys, w, positions.int(), RATIO)),
        (ValueError, "q must be 3-D", (q[0], keys, w, positions, RATIO)),
        (ValueError, "shapes do not agree", (q, keys[:, :16].contiguous(), w, positions, RATIO)),
        (ValueError, "shapes do not agree", (q, keys, w[:, :3].contiguous(), positions, RATIO)),
        (ValueError, "shapes do not agree", (q, keys, w, positions[:4], RATIO)),
        (ValueError, "q must be contiguous", (q.transpose(0, 1).contiguous().transpose(0, 1), keys, w, positions,
                                              RATIO)),
        (ValueError, "keys must be contiguous", (q, keys.t().contiguous().t(), w, positions, RATIO)),
        (ValueError, "ratio must be a positive int", (q, keys, w, positions, 0)),
    ]
    for error, message, args in bad:
        with pytest.raises(error, match=message):
            indexer_scores(*args)
        with pytest.raises(error, match=message):
            indexer_topk(*args, 4)
    with pytest.raises(ValueError, match="topk must be a positive int"):
        indexer_topk(q, keys, w, positions, RATIO, 0)
