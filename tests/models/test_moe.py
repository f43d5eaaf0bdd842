"""Routers against HF transformers' DeepseekV2/V3 routers (the oracle), the -inf group mask, and the MoE
block against a per-token loop written in the test."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from dsinfer.models import ModelArgs
from dsinfer.models.moe import Gate, MoE, set_moe_backend

# the fused kernels run compiled on a GPU, through Triton's interpreter on CPU
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            max_position_embeddings=1024, first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=4)

CASES = {
    "v2-lite greedy": ("deepseek_v2", dict(topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
                                           norm_topk_prob=False)),
    "v2 group-limited": ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                             routed_scaling_factor=16.0, norm_topk_prob=False)),
    "v3 noaux_tc": ("deepseek_v3", dict(n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)),
    "v3 no groups": ("deepseek_v3", dict(n_group=1, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True)),
}


def make(case):
    model_type, kw = CASES[case]
    cfg = dict(BASE, **kw, model_type=model_type)
    args = ModelArgs.from_hf_config(cfg)
    if model_type == "deepseek_v2":
        hf = DeepseekV2TopkRouter(DeepseekV2Config(**{k: v for k, v in cfg.items() if k != "model_type"}))
    else:
        hf = DeepseekV3TopkRouter(DeepseekV3Config(**{k: v for k, v in cfg.items() if k != "model_type"}))
    gate = Gate(args)
    torch.manual_seed(1)
    gate.weight.data = torch.randn(16, 32) * 0.3
    hf.weight.data = gate.weight.data.clone()
    if gate.bias is not None:
        gate.bias.data = torch.randn(16) * 0.5
        hf.e_score_correction_bias.data = gate.bias.data.clone()
    return args, gate, hf


@pytest.mark.parametrize("case", list(CASES))
def test_gate_matches_hf(case):
    _, gate, hf = make(case)
    x = torch.randn(64, 32)
    w, idx = gate(x)
    _, hf_w, hf_idx = hf(x)
    order, hf_order = idx.argsort(-1), hf_idx.argsort(-1)
    assert torch.equal(idx.gather(1, order), hf_idx.gather(1, hf_order))
    torch.testing.assert_close(w.gather(1, order), hf_w.float().gather(1, hf_order), rtol=1e-5, atol=1e-6)


def test_group_mask_is_minus_inf_not_zero():
    """All biased scores are negative here; masking dropped groups with 0 (not -inf) would pick them."""
    args, gate, _ = make("v3 noaux_tc")
    gate.weight.data.zero_()                                   # every sigmoid score is 0.5
    gate.bias.data = torch.tensor([-0.9] * 4 + [-0.7] * 4 + [-0.8] * 4 + [-0.9] * 4)   # biased: -.4 -.2 -.3 -.4
    w, idx = gate(torch.randn(3, 32))
    assert sorted((idx // 4).flatten().tolist()) == [1] * 12     # top-4 all from the best group
    torch.testing.assert_close(w, torch.full((3, 4), 2.5 / 4))  # unbiased scores, renormalised, scaled


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", ["v2 group-limited", "v3 noaux_tc"])
def test_moe_equals_per_token_loop(case, backend):
    args, _, _ = make(case)
    moe = MoE(args)
    set_moe_backend(moe, backend)
    torch.manual_seed(2)
    for p in moe.parameters():
        p.data = torch.randn_like(p) * 0.2
    x = torch.randn(10, 32)
    y = moe.to(DEVICE if backend == "triton" else "cpu")(x.to(DEVICE if backend == "triton" else "cpu")).cpu()
    moe.cpu()
    w, idx = moe.gate(x)
    e = moe.experts
    for t in range(10):
        ref = torch.zeros(32)
        for k in range(args.n_activated_experts):
            i = idx[t, k]
            h = F.silu(e.w1[i] @ x[t]) * (e.w3[i] @ x[t])
            ref += w[t, k] * (e.w2[i] @ h)
        s = moe.shared_experts
        ref += s.w2.weight @ (F.silu(s.w1.weight @ x[t]) * (s.w3.weight @ x[t]))
        torch.testing.assert_close(y[t], ref, rtol=1e-4, atol=1e-5)


def test_unknown_moe_backend_is_refused():
    args, _, _ = make("v3 noaux_tc")
    with pytest.raises(ValueError, match="choose one of torch, triton"):
        set_moe_backend(MoE(args), "cutlass")


@pytest.mark.parametrize("scaled, impl, mode", [
    (False, "auto", "plain"),
    (True, "weight_only", "weight_only"),
    (True, "fp8_gemm", "block_scaled"),           # FP8 tensor cores at every batch size
    (True, "auto", "auto"),    # CPU (interpreter): the torch path, so weight-only; FP8 GPUs: block-scaled
])
def test_fused_moe_mode(scaled, impl, mode):
    from dsinfer.models.layers import fused_moe_mode
    if mode == "auto":
        fp8_gpu = DEVICE.type == "cuda" and torch.cuda.get_device_capability(DEVICE) >= (8, 9)
        mode = "block_scaled" if fp8_gpu else "weight_only"
    assert fused_moe_mode(scaled, impl, DEVICE, (128, 128)) == mode
