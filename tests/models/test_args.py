"""ModelArgs from config.json: published-style configs parse to the fields and derived values the spec gives;
inconsistent or unsupported configs raise ValueError naming what is allowed."""

import pytest

from dsinfer.models import ModelArgs
from dsinfer.models.published import V2_LITE, V3  # published config.json values (spec section 1.3)


def test_v3_config():
    a = ModelArgs.from_hf_config(V3)
    assert (a.n_layers, a.n_dense_layers, a.n_mtp_layers) == (61, 3, 1)
    assert (a.score_func, a.topk_method, a.has_gate_bias, a.norm_topk_prob) == ("sigmoid", "noaux_tc", True, True)
    assert (a.n_expert_groups, a.n_limited_groups, a.route_scale) == (8, 4, 2.5)
    assert a.q_lora_rank == 1536 and a.kv_cache_dim == 576 and a.qk_head_dim == 192
    assert a.rope.rope_type == "yarn" and a.rope.factor == 40 and a.rope.original_seq_len == 4096
    assert a.quant is not None and a.quant.block_size == (128, 128) and a.quant.scale_fmt is None
    assert a.softmax_scale == pytest.approx(0.135234, abs=1e-6)


def test_v2_lite_config():
    a = ModelArgs.from_hf_config(V2_LITE)
    assert a.q_lora_rank == 0 and not a.has_gate_bias and a.quant is None
    assert (a.score_func, a.topk_method, a.n_expert_groups) == ("softmax", "greedy", 1)
    assert a.softmax_scale == pytest.approx(0.114721, abs=1e-6)


def test_v31_ue8m0_and_hf5_rope_parameters():
    cfg = dict(V3, quantization_config=dict(V3["quantization_config"], scale_fmt="ue8m0"))
    cfg.pop("rope_scaling")
    cfg.pop("rope_theta")
    cfg["rope_parameters"] = dict(rope_type="yarn", rope_theta=10000.0, factor=40.0,
                                  original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0,
                                  mscale_all_dim=1.0)
    a = ModelArgs.from_hf_config(cfg)
    assert a.quant.scale_fmt == "ue8m0"
    assert a.rope == ModelArgs.from_hf_config(V3).rope


@pytest.mark.parametrize("change, message", [
    (dict(model_type="llama"), "supported: deepseek_v2, deepseek_v3"),
    (dict(model_type="deepseek_v4"), "V4"),
    (dict(n_group=3), "n_group=3 must divide n_routed_experts=256"),
    (dict(topk_group=9), "topk_group=9 must be in [1, n_group=8]"),
    (dict(num_experts_per_tok=300), "num_experts_per_tok=300"),
    (dict(scoring_func="softmax"), "supported: softmax+greedy"),
    (dict(topk_method="bogus"), "unsupported routing"),
    (dict(hidden_act="gelu"), "silu"),
    (dict(first_k_dense_replace=70), "first_k_dense_replace=70"),
    (dict(qk_rope_head_dim=63), "even"),
    (dict(rope_scaling=dict(type="dynamic", factor=2.0)), "supported: default, yarn"),
    (dict(rope_scaling=dict(type="yarn")), "factor"),
    (dict(quantization_config=dict(quant_method="gptq")), "supported: fp8"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(hidden_size=None), "hidden_size"),
])
def test_bad_configs_raise(change, message):
    cfg = {k: v for k, v in {**V3, **change}.items() if v is not None}
    with pytest.raises(ValueError) as e:
        ModelArgs.from_hf_config(cfg)
    assert message in str(e.value)
