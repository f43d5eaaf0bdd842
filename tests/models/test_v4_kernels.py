"""DeepSeek-V4 with its attention-side Triton kernels (sparse attention with the sink, compressor pooling, indexer
scoring, hyper-connection mixing; `set_attn_backend(model, "triton")`) against its PyTorch path, which
tests/models/test_deepseek_v4.py checks against HF transformers. On CPU the kernels run through Triton's
interpreter; on a GPU, compiled. Prefill in chunks, then token by token, so that windows fill, compressed entries
complete (ratio 4 and 8) and the indexer picks among more entries than its top-k."""

import fixtures
import pytest
import torch

from dsinfer.checkpoint.loader_v4 import load_model_v4
from dsinfer.models.layers import set_attn_backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prompt(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [0] + torch.randint(7, fixtures.VOCAB, (n - 1,), generator=g).tolist()


def run(model, chunks):
    state = model.new_state()
    with torch.no_grad():
        return torch.cat([model.compute_logits(model(torch.tensor(c, device=DEVICE), [state], [len(c)]))
                          for c in chunks])


@pytest.mark.parametrize("simulate_qat", [False, True])
def test_kernels_equal_torch_through_prefill_and_decode(checkpoint, simulate_qat):
    model = load_model_v4(checkpoint("v4"), torch.float32, DEVICE, simulate_qat=simulate_qat, progress=False)[0]
    ids = prompt(37, 5)
    chunks = [ids[:19]] + [[t] for t in ids[19:]]
    set_attn_backend(model, "torch")
    want = run(model, chunks)
    set_attn_backend(model, "triton")
    csa = model.layers[1]
    assert csa.attn_backend == csa.attn.attn_backend == csa.attn.compressor.attn_backend == "triton"
    assert csa.attn.indexer.attn_backend == csa.attn.indexer.compressor.attn_backend == "triton"
    got = run(model, chunks)
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()
    assert (got.argmax(-1) == want.argmax(-1)).all()
