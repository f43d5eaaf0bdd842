"""DeepSeek-V4's MoE through the fused Triton kernel (the interpreter on CPU) against its PyTorch path: one layer
with FP4 experts and an FP8 shared expert, then the whole tiny model's logits in the published format (FP4 experts)
and in transformers' format (dense experts)."""

import fixtures
import pytest
import torch
import torch.nn.functional as F

from dsinfer.checkpoint.loader_v4 import load_model_v4
from dsinfer.models.moe import set_moe_backend
from dsinfer.models.v4_moe import swiglu_clamped

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="drives the fused kernel through the CPU "
                                "interpreter; on a GPU tests/kernels/test_fused_moe.py covers it compiled")

CPU = torch.device("cpu")


def prompt(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [0] + torch.randint(7, fixtures.VOCAB, (n - 1,), generator=g).tolist()


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    path = tmp_path_factory.mktemp("v4pub")
    fixtures.write_published_v4(fixtures.build_hf_model("v4", seed=1), path)
    return path


def logits(model, ids):
    state = model.new_state()
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(ids), [state], [len(ids)]))


def test_fp4_layer_fused_equals_torch_and_the_formula(published):
    model = load_model_v4(published, torch.float32, CPU, simulate_qat=False, progress=False)[0]
    for layer_id in (0, 1):                                    # hash-routed, then learned top-k
        moe = model.layers[layer_id].ffn
        assert moe.experts.fmt == "fp4" and moe.shared_experts.w1.weight.dtype == torch.float8_e4m3fn
        x = torch.randn(11, model.args.dim, generator=torch.Generator().manual_seed(layer_id)) * 4
        ids = torch.tensor(prompt(11, layer_id))
        set_moe_backend(model, "torch")
        want = moe(x, ids)
        set_moe_backend(model, "triton")
        assert moe.experts.backend == "triton"
        got = moe(x, ids)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        # The formula, expert by expert, with dequantized weights: sum_j W2 (w_j h_j) + shared.
        w, idx = moe.gate(x, ids)
        e, s = moe.experts, moe.shared_experts
        ref = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(idx.shape[1]):
                i = int(idx[t, j])
                h = swiglu_clamped(e.weight("w1", i, x.dtype) @ x[t], e.weight("w3", i, x.dtype) @ x[t], moe.limit)
                ref[t] += e.weight("w2", i, x.dtype) @ (w[t, j] * h)
            ref[t] += s.w2.dequantized(x.dtype) @ swiglu_clamped(s.w1.dequantized(x.dtype) @ x[t],
                                                                 s.w3.dequantized(x.dtype) @ x[t], moe.limit)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        clamped = F.linear(x, e.weight("w1", int(idx[0, 0]), x.dtype)).abs().max() > moe.limit
        assert clamped or layer_id == 0                        # the inputs are large enough to reach the clamp


@pytest.mark.parametrize("fmt", ["published", "hf"])
def test_model_logits_fused_equal_torch(fmt, published, checkpoint):
    path = published if fmt == "published" else checkpoint("v4")
    model = load_model_v4(path, torch.float32, CPU, simulate_qat=False, progress=False)[0]
    assert model.layers[1].ffn.experts.fmt == ("fp4" if fmt == "published" else "dense")
    ids = prompt(13, 3)
    want = logits(model, ids)
    set_moe_backend(model, "triton")
    got = logits(model, ids)
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()
