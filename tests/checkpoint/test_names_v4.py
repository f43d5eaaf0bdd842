"""The V4 name table: published names, the names transformers' saver writes and HF's module names all land on
the parameters of our model."""

import fixtures
import pytest
import torch
from safetensors import safe_open

from dsinfer.checkpoint.names_v4 import TargetV4, checkpoint_format, native_to_reference, to_native
from dsinfer.models.args_v4 import ModelArgsV4
from dsinfer.models.deepseek_v4 import Transformer


@pytest.mark.parametrize("name,fmt,want", [
    ("embed.weight", "reference", [TargetV4("embed.weight")]),
    ("layers.2.attn.kv_norm.weight", "reference", [TargetV4("layers.2.attn.kv_norm.weight")]),
    ("layers.1.attn.indexer.compressor.ape", "reference", [TargetV4("layers.1.attn.indexer.compressor.ape")]),
    ("layers.1.ffn.experts.5.w2.scale", "reference", [TargetV4("layers.1.ffn.experts.w2_scale", 5)]),
    ("mtp.0.attn.wq_a.weight", "reference", []),
    ("layers.4.attn.wq_a.weight", "reference", []),
    ("model.embed_tokens.weight", "hf", [TargetV4("embed.weight")]),
    ("head.weight", "hf", [TargetV4("head.weight")]),
    ("lm_head.weight", "hf", [TargetV4("head.weight")]),
    ("model.hc_head.hc_fn", "hf", [TargetV4("hc_head_fn")]),
    ("model.layers.0.attn.norm.weight", "hf", [TargetV4("layers.0.attn.kv_norm.weight")]),
    ("model.layers.0.self_attn.kv_norm.weight", "hf", [TargetV4("layers.0.attn.kv_norm.weight")]),
    ("model.layers.1.self_attn.compressor.kv_norm.weight", "hf", [TargetV4("layers.1.attn.compressor.norm.weight")]),
    ("model.layers.1.self_attn.compressor.indexer.position_bias", "hf",
     [TargetV4("layers.1.attn.indexer.compressor.ape")]),
    ("model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight", "hf",
     [TargetV4("layers.1.attn.indexer.weights_proj.weight")]),
    ("model.layers.1.self_attn.o_a_proj.weight_scale_inv", "hf", [TargetV4("layers.1.attn.wo_a.scale")]),
    ("model.layers.3.attn_hc.base", "hf", [TargetV4("layers.3.hc_attn_base")]),
    ("model.layers.3.mlp.gate.e_score_correction_bias", "hf", [TargetV4("layers.3.ffn.gate.bias")]),
    ("model.layers.3.mlp.experts.gate_up_proj", "hf",
     [TargetV4("layers.3.ffn.experts.w1", part=0), TargetV4("layers.3.ffn.experts.w3", part=1)]),
    ("model.layers.3.mlp.experts.down_proj", "hf", [TargetV4("layers.3.ffn.experts.w2")]),
    ("model.layers.3.mlp.shared_experts.up_proj.weight", "hf", [TargetV4("layers.3.ffn.shared_experts.w3.weight")]),
    ("model.rotary_emb.main_inv_freq", "hf", []),
])
def test_examples(name, fmt, want):
    assert to_native(name, fmt, n_layers=4) == want


def _our_params() -> set[str]:
    args = ModelArgsV4.from_hf_config(dict(fixtures.V4, model_type="deepseek_v4"))
    with torch.device("meta"):
        return {n for n, _ in Transformer(args).named_parameters()}


def test_saved_and_module_names_cover_our_parameters(checkpoint):
    ours = _our_params()
    with safe_open(checkpoint("v4") / "model.safetensors", "pt") as f:
        saved = list(f.keys())
    module_names = list(fixtures.build_hf_model("v4").state_dict())
    assert checkpoint_format(saved) == checkpoint_format(module_names) == "hf"
    for names in (saved, module_names):
        targets = {t.name for n in names for t in to_native(n, "hf", 4)}
        assert targets == ours


def test_reference_names_round_trip():
    ours = _our_params()
    for name in ours:
        expert = 3 if ".experts.w" in name else None
        ref = native_to_reference(name, expert)
        assert checkpoint_format([ref]) == "reference"
        assert to_native(ref, "reference", 4) == [TargetV4(name, expert)]
    with pytest.raises(ValueError, match="format"):
        to_native("embed.weight", "gguf", 4)
