"""The DeepSeek-V4 batched decode path (Transformer.decode over the engine's slot-and-page stores, what the CUDA
graphs replay) against the oracle: the model's plain per-sequence path, each sequence alone with its own growing
state. Teacher-forced: both see the same tokens, and every step's logits are compared. Four sequences start
decoding at positions 1, 15, 19 and 70 of the tiny V4 (window 16, CSA ratio 4 with top-4, HCA ratio 8) and decode
12 steps: windows fill and wrap, entries complete mid-batch for some rows only, the indexer goes from taking
every entry to scoring; pages of 4 hold half an HCA window, pages of 8 one, and block tables are scattered."""

import pytest
import torch
from fixtures import stable_topk

from dsinfer.checkpoint.loader_v4 import load_model_v4
from dsinfer.engine.v4_cache import V4Cache
from dsinfer.engine.v4_runner import V4ModelRunner, V4StepBatch
from dsinfer.kernels.triton_common import interpreting
from dsinfer.models.layers import set_attn_backend

STARTS = [1, 15, 19, 70]
STEPS = 12


@pytest.fixture(scope="module")
def model(checkpoint):
    m, _ = load_model_v4(checkpoint("v4"), torch.float32, torch.device("cpu"), simulate_qat=False, progress=False)
    m.init_rope(256, torch.device("cpu"))
    return m


def run_both(model, page_size, seed=0):
    """(decode-path logits, per-sequence logits), each (STEPS, B, V)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.args.vocab_size
    B, max_len = len(STARTS), max(STARTS) + STEPS
    pages_each = -(-max_len // page_size)
    cache = V4Cache(model.args, B * pages_each + 3, page_size, B + 2, torch.float32, torch.device("cpu"))
    runner = V4ModelRunner(model, cache, torch.device("cpu"))
    order = torch.randperm(B * pages_each, generator=g).tolist()
    tables = [order[b * pages_each:(b + 1) * pages_each] for b in range(B)]
    slots = [2, 0, 3, 1]
    prompts = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in STARTS]
    steps = torch.randint(2, vocab, (STEPS, B), generator=g).tolist()
    with torch.inference_mode():
        runner.execute(V4StepBatch(sum(prompts, []), list(STARTS), [0] * B, slots, tables))     # prefill
        states = [model.new_state() for _ in STARTS]
        for p, state in zip(prompts, states):
            model(torch.tensor(p), [state], [len(p)])
        got, want = [], []
        for i, ids in enumerate(steps):
            pos = [n + i for n in STARTS]
            got.append(runner.execute(V4StepBatch(ids, [1] * B, pos, slots, tables)))
            want.append(torch.cat([model.compute_logits(model(torch.tensor([t]), [s], [1])) for t, s in
                                   zip(ids, states)]))
    return torch.stack(got), torch.stack(want)


@pytest.mark.parametrize("page_size", [4, 8])
@pytest.mark.parametrize("simulate_qat", [False, True])
def test_decode_path_equals_the_per_sequence_path(model, page_size, simulate_qat, monkeypatch):
    """With the QAT simulation on, the indexer's FP4-rounded queries and keys make exact ties (scores of 0 after
    the ReLU) common, and torch.topk's choice among ties depends on the row's length (the decode path's rows
    span the batch's longest context, the plain path's the sequence's own); ties are broken by index here so
    that the rest of the two paths is compared exactly. Float noise of the two paths' different batch shapes
    (1e-6) can still cross an FP8 rounding step of the key/value rows; seen so far: 6e-3 on one row's logits."""
    if simulate_qat:
        monkeypatch.setattr(torch.Tensor, "topk", stable_topk)
    model.set_simulate_qat(simulate_qat)
    try:
        got, want = run_both(model, page_size)
    finally:
        model.set_simulate_qat(False)
    torch.testing.assert_close(got, want, atol=5e-2 if simulate_qat else 2e-4, rtol=1e-4)


def test_decode_path_with_the_triton_kernels(model, monkeypatch):
    """The attention-side kernels (interpreter on CPU), the indexer's row-table scoring among them. The tiny
    model's 4 indexer heads all ReLU to 0 for about 1 entry in 16, so ties are pinned as above."""
    pytest.importorskip("triton")
    if not interpreting():
        pytest.skip("the tiny model runs on CPU, and this machine has a GPU: Triton's interpreter is off")
    monkeypatch.setattr(torch.Tensor, "topk", stable_topk)
    set_attn_backend(model, "triton")
    try:
        got, want = run_both(model, 8, seed=1)
    finally:
        set_attn_backend(model, "torch")
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
