"""The V4 compressor's pooling step and its decode update. Pooling: the PyTorch twin against a float64 reference
(softmax pooling, the RMS formula, rotation as complex multiplication), and the Triton kernel (Triton's interpreter
on CPU) against the twin; grids cross the slot counts of CSA (4, 8 with overlap) and HCA (128), -inf slots of a
missing previous window, d not a power of two, a ragged last slot block, both rotary widths and float32 / bfloat16
output. Decode update: the kernel against its twin over steps that cross window ends (the twin is checked against
the plain per-sequence compressor through the engine, tests/engine/test_v4_decode.py)."""

import pytest
import torch

from dsinfer.kernels.v4_compress import (
    compress_decode,
    compress_decode_torch,
    compress_pool,
    compress_pool_torch,
)
from dsinfer.models.args import RopeArgs
from dsinfer.models.rope import rope_cos_sin

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"     # CPU: Triton's interpreter (set in conftest)
EPS = 1e-6


def case(n, slots, d, rd, missing, seed=0):
    """kv, score (n, slots, d); norm weight (d,); cos_sin (n, rd/2, 2) from a real rope table. With `missing`,
    entry 0 has no previous window (its first half of slots: kv 0, score -inf, as Compressor.forward builds it),
    and other entries have scattered -inf scores (never a whole column)."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(n, slots, d, generator=g) * 3
    score = torch.randn(n, slots, d, generator=g) * 2
    if missing:
        kv[0, :slots // 2] = 0
        score[0, :slots // 2] = float("-inf")
        scattered = torch.rand(n, slots, d, generator=g) < 0.3
        scattered[0], scattered[:, -1] = False, False
        score[scattered] = float("-inf")
    weight = 1 + 0.5 * torch.randn(d, generator=g)
    positions = torch.randint(0, 4096, (n,), generator=g) // 4 * 4
    table = rope_cos_sin(RopeArgs(rope_type="yarn", factor=16.0, original_seq_len=1024), rd, 4096)
    return kv, score, weight, table[positions].contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,slots,d,rd,missing", [(1, 4, 128, 64, False), (3, 8, 96, 32, True),
                                                   (2, 128, 512, 64, True), (3, 8, 64, 64, True)])
def test_twin_equals_a_float64_reference(n, slots, d, rd, missing, dtype):
    kv, score, weight, cos_sin = case(n, slots, d, rd, missing)
    p = torch.exp(score.double() - score.double().amax(dim=1, keepdim=True))
    pooled = (kv.double() * p).sum(dim=1) / p.sum(dim=1)
    y = pooled / (pooled.square().mean(-1, keepdim=True) + EPS).sqrt() * weight.double()
    angles = torch.atan2(cos_sin[..., 1].double(), cos_sin[..., 0].double())
    scale = cos_sin.double().norm(dim=-1)                      # YaRN tables carry an attention factor
    rot = torch.view_as_complex(y[:, -rd:].reshape(n, -1, 2).contiguous()) * torch.polar(scale, angles)
    want = torch.cat([y[:, :-rd], torch.view_as_real(rot).flatten(1)], dim=-1)
    got = compress_pool_torch(kv, score, weight, cos_sin, EPS, dtype)
    assert got.dtype == dtype and got.shape == (n, d)
    tol = 1e-5 if dtype == torch.float32 else 3 * 2.0 ** -8    # bf16: rounded after pooling, norm and rotation
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def assert_matches(got, want, dtype):
    got, want = got.cpu(), want.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.isfinite(got.float()).all()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:       # about 1 bf16 ulp (entries are O(1)), and nearly every element rounded to the same value
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=2 ** -7)
        assert (got != want).sum() <= max(2, got.numel() // 100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rd", [64, 32])
@pytest.mark.parametrize("d", [128, 96, 512])
@pytest.mark.parametrize("slots,missing", [(4, False), (8, False), (8, True), (128, False), (128, True)])
@pytest.mark.parametrize("n", [1, 3])
def test_kernel_equals_twin(n, slots, missing, d, rd, dtype):
    pytest.importorskip("triton")
    kv, score, weight, cos_sin = (t.to(DEVICE) for t in case(n, slots, d, rd, missing, seed=1))
    want = compress_pool_torch(kv, score, weight, cos_sin, EPS, dtype)
    assert_matches(compress_pool(kv, score, weight, cos_sin, EPS, dtype), want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,slots,d,rd", [(2, 20, 512, 64), (1, 4, 64, 64), (2, 8, 2, 2)])
def test_kernel_corners(n, slots, d, rd, dtype):
    """A ragged last slot block (20 slots in blocks of 8 at d = 512), rd == d, the smallest row."""
    pytest.importorskip("triton")
    kv, score, weight, cos_sin = (t.to(DEVICE) for t in case(n, slots, d, rd, True, seed=2))
    want = compress_pool_torch(kv, score, weight, cos_sin, EPS, dtype)
    assert_matches(compress_pool(kv, score, weight, cos_sin, EPS, dtype), want, dtype)


def test_kernel_with_no_entries():
    kv, score, weight, cos_sin = (t.to(DEVICE) for t in case(1, 8, 96, 32, False))
    out = compress_pool(kv[:0], score[:0], weight, cos_sin[:0], EPS, torch.bfloat16)
    assert out.shape == (0, 96) and out.dtype == torch.bfloat16


def test_kernel_checks_its_arguments():
    kv, score, weight, cos_sin = (t.to(DEVICE) for t in case(2, 8, 96, 32, False))
    with pytest.raises(TypeError, match="score must be float32; got bfloat16"):
        compress_pool(kv, score.bfloat16(), weight, cos_sin, EPS, torch.bfloat16)
    with pytest.raises(TypeError, match="out_dtype must be float32, float16, bfloat16"):
        compress_pool(kv, score, weight, cos_sin, EPS, torch.int8)
    with pytest.raises(ValueError, match="kv must be 3-D"):
        compress_pool(kv[0], score, weight, cos_sin, EPS, torch.float32)
    with pytest.raises(ValueError, match="kv must be contiguous"):
        compress_pool(kv.transpose(1, 2).contiguous().transpose(1, 2), score, weight, cos_sin, EPS, torch.float32)
    with pytest.raises(ValueError, match="cos_sin must be contiguous"):
        compress_pool(kv, score, weight, cos_sin.transpose(0, 1).contiguous().transpose(0, 1), EPS,
                      torch.float32)
    with pytest.raises(ValueError, match="shapes do not agree"):
        compress_pool(kv, score[:, :4].contiguous(), weight, cos_sin, EPS, torch.float32)
    with pytest.raises(ValueError, match="shapes do not agree"):
        compress_pool(kv, score, weight[:64].contiguous(), cos_sin, EPS, torch.float32)
    with pytest.raises(ValueError, match="shapes do not agree"):
        compress_pool(kv, score, weight, cos_sin[:1].contiguous(), EPS, torch.float32)
    with pytest.raises(ValueError, match="0 < rd <= d"):
        compress_pool(kv, score, weight, torch.zeros(2, 49, 2, device=DEVICE), EPS, torch.float32)
    with pytest.raises(ValueError, match="even d"):
        compress_pool(kv[..., :95].contiguous(), score[..., :95].contiguous(), weight[:95].contiguous(), cos_sin,
                      EPS, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_rounds_ties_to_even(dtype):
    """One slot: the pooled row is kv itself, here float32 values half way between two bfloat16 values (odd and
    even last bits, ones that carry into the exponent), so `pooled.to(bfloat16)` must round ties to even."""
    g = torch.Generator().manual_seed(3)
    exponent = torch.randint(124, 130, (2, 1, 512), generator=g, dtype=torch.int32) << 7   # |x| in [1/8, 8)
    high = exponent | torch.randint(0, 128, (2, 1, 512), generator=g, dtype=torch.int32)
    high[..., :4] = torch.tensor([0x3F7F, 0x3F80, 0x3F81, 0x407F])     # odd and even last bits, carries
    kv = (high << 16 | 0x8000).view(torch.float32)                     # half a bfloat16 ulp above each `high`
    kv = kv * (torch.randint(0, 2, kv.shape, generator=g) * 2 - 1)     # either sign
    score, weight = torch.zeros_like(kv), torch.ones(512)
    cos_sin = rope_cos_sin(RopeArgs(), 64, 8)[torch.tensor([0, 4])]
    args = [t.to(DEVICE) for t in (kv, score, weight, cos_sin)]
    want = compress_pool_torch(*args, EPS, dtype)
    assert_matches(compress_pool(*args, EPS, dtype), want, dtype)


def decode_state(slots, m, d, overlap, rows, dtype, g):
    """Buffers (slots, m, width) and prev (slots, m, d) float32 with stale values, entries (rows, d) of garbage."""
    width = (2 if overlap else 1) * d
    state = {"kv_buf": torch.randn(slots, m, width, generator=g),
             "score_buf": torch.randn(slots, m, width, generator=g),
             "prev_kv": torch.randn(slots, m, d, generator=g) if overlap else None,
             "prev_score": torch.randn(slots, m, d, generator=g) if overlap else None,
             "entries": torch.randn(rows, d, generator=g).to(dtype)}
    return state


@pytest.mark.parametrize("m,d,rd,overlap,rotate,qat,dtype", [
    (4, 128, 64, True, True, True, torch.bfloat16),        # the indexer's compressor
    (4, 128, 64, True, True, False, torch.bfloat16),
    (4, 192, 64, True, False, True, torch.bfloat16),       # CSA attention: FP8 rounding of the non-rotary dims
    (8, 96, 32, False, False, False, torch.float32),
    (128, 64, 64, False, False, True, torch.bfloat16),     # HCA: rd == d, nothing to round
])
def test_decode_update_equals_twin(m, d, rd, overlap, rotate, qat, dtype):
    """Steps of one token for 3 sequences at staggered positions (crossing window ends, the first window with
    overlap) and a padding row on the scratch slot: every buffer, prev and entry the twin writes, the kernel writes
    alike; rows that complete no window leave the entries untouched. Odd steps pass kv and score as column slices
    of one tensor (rows 2 width apart)."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(m + d)
    B, n_slots, E = 4, 5, 6
    width = (2 if overlap else 1) * d
    start = torch.tensor([0, m - 2, 3 * m - 1, 0]) if m < 128 else torch.tensor([125, 126, 254, 0])
    slots = torch.tensor([2, 0, 3, n_slots - 1])                                    # the last row: padding
    entry_rows = torch.randperm(B * E, generator=g)[:B * E].view(B, E) % (B * E)
    entry_rows[3] = B * E                                                           # padding: a scratch row
    rows = B * E + 1
    ape = torch.randn(m, width, generator=g)
    weight = 1 + 0.5 * torch.randn(d, generator=g)
    table = rope_cos_sin(RopeArgs(rope_type="yarn", factor=16.0, original_seq_len=1024), rd, 4096)
    twin, kern = decode_state(n_slots, m, d, overlap, rows, dtype, g), None
    kern = {k: (None if v is None else v.clone().to(DEVICE)) for k, v in twin.items()}
    for step in range(2 * m if m < 128 else 4):
        pos = start + step
        pos[3] = 0
        kv, score = torch.randn(B, width, generator=g) * 2, torch.randn(B, width, generator=g)
        common = dict(eps=EPS, rotate=rotate, qat=qat)
        compress_decode_torch(kv, score, ape, pos, slots, twin["kv_buf"], twin["score_buf"], twin["prev_kv"],
                              twin["prev_score"], weight, table, twin["entries"], entry_rows, **common)
        dev = [t.to(DEVICE) for t in (kv, score, ape, pos, slots)]
        if step % 2:                   # as the engine's stacked projection gives them: column slices of one
            dev[:2] = torch.cat([kv, score], dim=1).to(DEVICE).chunk(2, dim=1)
        compress_decode(*dev, kern["kv_buf"], kern["score_buf"], kern["prev_kv"], kern["prev_score"],
                        weight.to(DEVICE), table.to(DEVICE), kern["entries"], entry_rows.to(DEVICE), **common)
        for name in ("kv_buf", "score_buf", "prev_kv", "prev_score"):
            if twin[name] is not None:
                torch.testing.assert_close(kern[name][:-1].cpu(), twin[name][:-1], rtol=0, atol=0)
        got, want = kern["entries"][:-1].cpu().float(), twin["entries"][:-1].float()
        ulp = 2 ** -7 if dtype == torch.bfloat16 else 1e-5
        off = (got - want).abs() > ulp * want.abs() + 1e-5
        assert off.sum() <= max(2, got.numel() // 100), (step, off.sum().item(), (got - want).abs().max().item())


def test_decode_update_checks_its_arguments():
    g = torch.Generator().manual_seed(0)
    st = {k: (None if v is None else v.to(DEVICE)) for k, v in decode_state(2, 4, 128, True, 8, torch.bfloat16,
                                                                              g).items()}
    kv, score, ape = torch.randn(1, 256, device=DEVICE), torch.randn(1, 256, device=DEVICE), \
        torch.randn(4, 256, device=DEVICE)
    table = rope_cos_sin(RopeArgs(), 64, 64).to(DEVICE)
    args = [kv, score, ape, torch.zeros(1, dtype=torch.long, device=DEVICE), torch.zeros(1, dtype=torch.long,
                                                                                          device=DEVICE),
            st["kv_buf"], st["score_buf"], st["prev_kv"], st["prev_score"], torch.ones(128, device=DEVICE), table,
            st["entries"], torch.zeros(1, 2, dtype=torch.long, device=DEVICE)]
    with pytest.raises(ValueError, match="shapes do not agree: ape"):
        compress_decode(*args[:2], ape[:, :128].contiguous(), *args[3:], EPS, True, True)
    with pytest.raises(ValueError, match="0 < rd <= d"):
        compress_decode(*args[:10], rope_cos_sin(RopeArgs(), 200, 64).to(DEVICE), *args[11:], EPS, True, True)
    with pytest.raises(TypeError, match="positions must be int64"):
        compress_decode(*args[:3], args[3].int(), *args[4:], EPS, True, True)
    with pytest.raises(ValueError, match="rows must have one stride"):
        compress_decode(kv, torch.randn(1, 512, device=DEVICE)[:, :256], *args[2:], EPS, True, True)
    with pytest.raises(ValueError, match="kv must be contiguous"):
        compress_decode(torch.randn(256, 2, device=DEVICE).t(), score, *args[2:], EPS, True, True)
