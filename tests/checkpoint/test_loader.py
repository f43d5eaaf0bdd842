"""Checkpoint loading: sharded and single-file checkpoints give the same model; every kind of broken
checkpoint is a one-line ValueError that names the problem."""

import json
import shutil

import fixtures
import pytest
import torch
from safetensors.torch import load_file, save_file

from dsinfer import LLM
from dsinfer.checkpoint import hf_to_native, load_model, native_to_hf


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_sharded_equals_single_file(tmp_path, checkpoint):
    fixtures.build_hf_model("v3").save_pretrained(tmp_path, max_shard_size="100KB")
    fixtures.write_tokenizer(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ids = [0, 5, 9, 33, 100, 7]
    a = LLM(tmp_path, device="cpu", dtype="float32", progress=False).logits(ids)
    b = LLM(checkpoint("v3"), device="cpu", dtype="float32", progress=False).logits(ids)
    assert torch.equal(a, b)


def test_dtypes_after_load(checkpoint):
    model, _ = load_model(checkpoint("v3"), torch.bfloat16, torch.device("cpu"), progress=False)
    assert model.layers[0].attn.wq_a.weight.dtype == torch.bfloat16
    assert model.layers[0].attn_norm.weight.dtype == torch.float32
    assert model.layers[1].ffn.gate.bias.dtype == torch.float32           # correction bias stays fp32
    assert model.layers[1].ffn.experts.w1.shape == (8, 32, 64)
    assert not any(p.is_meta for p in model.parameters())


def test_names_round_trip(checkpoint):
    names = load_file(checkpoint("v3") / "model.safetensors").keys()
    for hf in list(names) + ["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv",
                             "model.layers.0.self_attn.q_b_proj.weight_scale_inv"]:
        t = hf_to_native(hf, n_layers=3)
        assert native_to_hf(t.name, t.expert) == hf
    assert hf_to_native("model.layers.3.eh_proj.weight", n_layers=3) is None        # MTP layer


@pytest.mark.parametrize("breakage, message", [
    ("no_dir", "does not exist"),
    ("no_config", "has no config.json"),
    ("bad_config_json", "not valid JSON"),
    ("no_weights", "no safetensors weights"),
    ("missing_tensor", "missing 1 tensor(s), e.g. model.layers.1.mlp.experts.5.down_proj.weight"),
    ("misshaped_tensor", "model.layers.0.self_attn.kv_b_proj.weight has shape [64, 32], expected [128, 32]"),
    ("truncated", "truncated"),
    ("unknown_tensor", "does not use, e.g. model.layers.0.self_attn.rotary_bogus.weight"),
    ("missing_shard", "missing: model-00002"),
    ("fp8_without_scale", "weight_scale_inv is missing"),
    ("bad_scale_shape", "expected [1, 1]"),
    ("no_tokenizer", "no tokenizer.json"),
    ("unsupported_type", "unsupported model_type 'deepseek_v32'"),
])
def test_broken_checkpoints(breakage, message, tmp_path, checkpoint):
    path = copy_checkpoint(checkpoint("v3"), tmp_path / "ckpt")
    st = path / "model.safetensors"
    if breakage == "no_dir":
        path = tmp_path / "nowhere"
    elif breakage == "no_config":
        (path / "config.json").unlink()
    elif breakage == "bad_config_json":
        (path / "config.json").write_text("{not json")
    elif breakage == "no_weights":
        st.unlink()
    elif breakage == "missing_tensor":
        rewrite(path, lambda t: t.pop("model.layers.1.mlp.experts.5.down_proj.weight"))
    elif breakage == "misshaped_tensor":
        rewrite(path, lambda t: t.update({"model.layers.0.self_attn.kv_b_proj.weight": torch.zeros(64, 32)}))
    elif breakage == "truncated":
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    elif breakage == "unknown_tensor":
        rewrite(path, lambda t: t.update({"model.layers.0.self_attn.rotary_bogus.weight": torch.zeros(2)}))
    elif breakage == "missing_shard":
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    elif breakage == "fp8_without_scale":
        rewrite(path, lambda t: t.update({"model.layers.0.self_attn.o_proj.weight":
                                          t["model.layers.0.self_attn.o_proj.weight"].to(torch.float8_e4m3fn)}))
    elif breakage == "bad_scale_shape":
        def fp8(t):
            t["model.layers.0.self_attn.o_proj.weight"] = t["model.layers.0.self_attn.o_proj.weight"].to(
                torch.float8_e4m3fn)
            t["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.ones(2, 2)
        rewrite(path, fp8)
    elif breakage == "no_tokenizer":
        (path / "tokenizer.json").unlink()
    elif breakage == "unsupported_type":
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(dict(cfg, model_type="deepseek_v32")))
    with pytest.raises(ValueError) as e:
        LLM(path, device="cpu", dtype="float32", progress=False)
    assert message in str(e.value)
    assert "\n" not in str(e.value)
