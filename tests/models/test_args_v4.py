"""ModelArgsV4 from the published V4-Flash config.json and from the config.json HF transformers writes."""

import dataclasses
import json

import fixtures
import pytest

from dsinfer.models.args_v4 import CSA, HCA, SLIDING, ModelArgsV4
from dsinfer.models.published import V4_FLASH


def test_v4_flash_schedule_and_ropes():
    a = ModelArgsV4.from_hf_config(V4_FLASH)
    assert a.n_layers == 43 and len(a.attn_types) == 43 and len(a.compress_ratios) == 43   # MTP entry dropped
    assert a.attn_types.count(SLIDING) == 2 and a.attn_types.count(CSA) == 21 and a.attn_types.count(HCA) == 20
    assert a.attn_types[:4] == (SLIDING, SLIDING, CSA, HCA) and a.compress_ratios[2:4] == (4, 128)
    assert a.hash_layers == (True,) * 3 + (False,) * 40
    assert (a.rope.rope_type, a.rope.theta) == ("default", 10000.0)
    c = a.compress_rope
    assert (c.rope_type, c.theta, c.factor, c.original_seq_len, c.attention_factor) == \
        ("yarn", 160000.0, 16.0, 65536, 1.0)
    assert (a.head_dim, a.rope_head_dim, a.nope_head_dim, a.window_size) == (512, 64, 448, 128)
    assert abs(a.softmax_scale - 0.044194) < 1e-6
    assert a.quant.scale_fmt == "ue8m0" and a.n_mtp_layers == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.dim = 1


def test_hf_written_config_equals_published_one(checkpoint):
    """The tiny model's config.json as transformers writes it (layer_types, nested rope_parameters) parses to the
    same arguments as the published spelling of the same model (compress_ratios, rope_scaling)."""
    hf = ModelArgsV4.from_hf_config(json.loads((checkpoint("v4") / "config.json").read_text()))
    kw = {k: v for k, v in fixtures.V4.items() if k not in ("layer_types", "compress_rates", "initializer_range")}
    published = ModelArgsV4.from_hf_config(dict(kw, model_type="deepseek_v4", compress_ratios=[0, 4, 8, 4, 0],
                                                 num_nextn_predict_layers=1))
    assert hf == published
    assert hf.attn_types == (SLIDING, CSA, HCA, CSA) and hf.compress_ratios == (0, 4, 8, 4)
    assert hf.hash_layers == (True, False, False, False)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "deepseek_v3"}, "deepseek_v4"),
    ({"compress_ratios": None}, "neither compress_ratios nor layer_types"),
    ({"compress_ratios": [0, 4]}, "compress_ratios has 2 entries"),
    ({"compress_ratios": [0, 4, -1, 4, 0]}, "ratios must be positive"),
    ({"layer_types": ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]},
     "unknown layer_types"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"topk_method": "greedy"}, "topk_method"),
    ({"norm_topk_prob": False}, "norm_topk_prob"),
    ({"num_key_value_heads": 4}, "num_key_value_heads"),
    ({"n_shared_experts": 2}, "n_shared_experts"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"o_groups": 3}, "o_groups"),
    ({"index_head_dim": 96}, "power of two"),
    ({"qk_rope_head_dim": 512}, "qk_rope_head_dim"),
    ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling type"),
    ({"rope_scaling": {"type": "yarn", "factor": 16}}, "original_max_position_embeddings"),
    ({"head_dim": None}, "head_dim"),
])
def test_bad_configs_raise_value_error(change, message):
    cfg = dict(V4_FLASH, num_hidden_layers=4, compress_ratios=[0, 4, 128, 4, 0])
    cfg.update(change)
    with pytest.raises(ValueError, match=message):
        ModelArgsV4.from_hf_config(cfg)
