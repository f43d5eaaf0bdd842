"""`dsinfer convert`: rank files hold the reference-style slices (checked against the original tensors by
hand-written slicing), a converted folder loads to bit-identical logits, FP8 scales follow their weights, and
sizes that do not divide are one-line errors."""

import json

import fixtures
import pytest
import torch
from safetensors.torch import load_file

from dsinfer import LLM
from dsinfer.checkpoint import convert_checkpoint
from dsinfer.checkpoint.convert import check_tp
from dsinfer.cli import main
from dsinfer.models import ModelArgs
from dsinfer.models.published import V3


def prompt(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [0] + torch.randint(7, fixtures.VOCAB, (n - 1,), generator=g).tolist()


def logits(path, ids, dtype="float32"):
    return LLM(path, device="cpu", dtype=dtype, progress=False).logits(ids)


@pytest.mark.parametrize("name", ["v2-lite", "v2", "v3"])
def test_converted_loads_to_identical_logits(name, checkpoint, tmp_path):
    ids = prompt(24, 1)
    ref = logits(checkpoint(name), ids)
    for tp in (2, 4):
        out = convert_checkpoint(checkpoint(name), tmp_path / f"tp{tp}", tp, progress=False)
        assert sorted(p.name for p in out.glob("*.safetensors")) == [f"model{r}-mp{tp}.safetensors" for r in range(tp)]
        assert torch.equal(logits(out, ids), ref)


def test_rank_files_hold_reference_slices(checkpoint, tmp_path):
    src = checkpoint("v3")
    full = load_file(src / "model.safetensors")
    tp = 4
    out = convert_checkpoint(src, tmp_path / "tp", tp, progress=False)
    ranks = [load_file(out / f"model{r}-mp{tp}.safetensors") for r in range(tp)]
    manifest = json.loads((out / "dsinfer_tp.json").read_text())
    assert manifest["tp_size"] == tp and manifest["experts_per_rank"] == 2
    assert set(manifest["tensors"]) == set(full)
    rows = ["model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_b_proj.weight",
            "model.layers.2.self_attn.kv_b_proj.weight", "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.shared_experts.up_proj.weight"]
    cols = ["model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight",
            "model.layers.2.mlp.shared_experts.down_proj.weight"]
    whole = ["model.norm.weight", "model.layers.1.input_layernorm.weight", "model.layers.1.self_attn.q_a_proj.weight",
             "model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "model.layers.1.self_attn.kv_a_layernorm.weight",
             "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias"]
    for r, rank in enumerate(ranks):
        for k in rows:
            assert torch.equal(rank[k], full[k].chunk(tp, 0)[r]) and manifest["tensors"][k]["split_dim"] == 0
        for k in cols:
            assert torch.equal(rank[k], full[k].chunk(tp, 1)[r]) and manifest["tensors"][k]["split_dim"] == 1
        for k in whole:
            assert torch.equal(rank[k], full[k]) and manifest["tensors"][k]["split_dim"] is None
        experts = {int(k.split(".")[5]) for k in rank if ".mlp.experts." in k}
        assert experts == {2 * r, 2 * r + 1}
        for k in rank:
            if ".mlp.experts." in k:
                assert torch.equal(rank[k], full[k]) and manifest["tensors"][k]["rank"] == r
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes()
    assert not (out / "model.safetensors.index.json").exists()


def test_fp8_scales_split_with_their_weights(tmp_path):
    fp8 = fixtures.write_fp8_wide(tmp_path)
    out = convert_checkpoint(fp8, tmp_path / "tp2", 2, progress=False)
    full = load_file(fp8 / "model.safetensors")
    r1 = load_file(out / "model1-mp2.safetensors")
    k = "model.layers.1.self_attn.o_proj.weight"
    assert r1[k].dtype == torch.float8_e4m3fn
    assert torch.equal(r1[k].view(torch.uint8), full[k].view(torch.uint8).chunk(2, 1)[1])
    assert torch.equal(r1[k + "_scale_inv"], full[k + "_scale_inv"].chunk(2, 1)[1])
    ids = prompt(20, 2)
    assert torch.equal(logits(out, ids), logits(fp8, ids))
    with pytest.raises(ValueError) as e:
        convert_checkpoint(fp8, tmp_path / "tp4", 4, progress=False)
    assert "cut the FP8 scale blocks" in str(e.value) and "multiple of 4 x 128" in str(e.value)
    assert not (tmp_path / "tp4").exists()


@pytest.mark.parametrize("change, tp, message", [
    ({}, 3, "--tp 3 does not divide num_attention_heads = 128"),
    ({}, 0, "--tp must be a positive integer"),
    (dict(n_routed_experts=96), 64, "does not divide n_routed_experts = 96"),
    (dict(vocab_size=129281), 2, "does not divide vocab_size = 129281"),
    (dict(intermediate_size=18000), 256 // 2, "does not divide intermediate_size"),
    (dict(moe_intermediate_size=2047, n_routed_experts=128), 2, "shared-expert width"),
])
def test_sizes_that_do_not_divide(change, tp, message):
    with pytest.raises(ValueError) as e:
        check_tp(ModelArgs.from_hf_config({**V3, **change}), tp)
    assert message in str(e.value)


def test_cli_errors_and_broken_tp_folder(checkpoint, tmp_path, capsys):
    assert main(["convert", "--model", str(checkpoint("v3")), "--out", str(tmp_path / "x"), "--tp", "3"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "dsinfer: error: --tp 3 does not divide num_attention_heads = 4"
    assert not (tmp_path / "x").exists()
    assert main(["convert", "--model", str(checkpoint("v3")), "--out", str(tmp_path / "tp2"), "--tp", "2"]) == 0
    with pytest.raises(ValueError, match="is already a tensor-parallel folder"):
        convert_checkpoint(tmp_path / "tp2", tmp_path / "tp4", 2, progress=False)
    (tmp_path / "tp2" / "model1-mp2.safetensors").unlink()
    with pytest.raises(ValueError, match="rank file.*missing: model1-mp2.safetensors"):
        LLM(tmp_path / "tp2", device="cpu", dtype="float32", progress=False)


def test_mtp_layer_is_carried_over(checkpoint, tmp_path):
    from checkpoint.test_cast import add_mtp_layer
    src = tmp_path / "src"
    src.mkdir()
    for f in checkpoint("v3").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    add_mtp_layer(src)
    out = convert_checkpoint(src, tmp_path / "tp2", 2, progress=False)
    full = load_file(src / "model.safetensors")
    ranks = [load_file(out / f"model{r}-mp2.safetensors") for r in range(2)]
    head, eh = "model.layers.3.shared_head.head.weight", "model.layers.3.eh_proj.weight"
    assert torch.equal(ranks[1][head], full[head].chunk(2, 0)[1]) and torch.equal(ranks[1][eh], full[eh])
    assert "model.layers.3.mlp.experts.7.up_proj.weight" in ranks[1]
    assert {k for r in ranks for k in r} == set(full)
    ids = prompt(12, 3)
    assert torch.equal(logits(out, ids), logits(checkpoint("v3"), ids))
