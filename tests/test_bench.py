"""`dsinfer bench`: random-weight models of a config's shapes (FP8 where the config says so) run through the
engine; the weight-bytes count follows spec/anchors.md."""

import json

import fixtures
import pytest
import torch

from dsinfer.bench import bench_config, random_model, weight_bytes_per_step
from dsinfer.cli import main
from dsinfer.models import ModelArgs


def tiny_fp8_config(tmp_path):
    cfg = fixtures.build_hf_model("v3").config.to_dict()
    cfg["quantization_config"] = dict(activation_scheme="dynamic", fmt="e4m3", quant_method="fp8",
                                      weight_block_size=[128, 128])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return cfg


def test_random_fp8_model_shapes(tmp_path):
    args = ModelArgs.from_hf_config(tiny_fp8_config(tmp_path))
    model = random_model(args, torch.float32, torch.device("cpu"))
    assert model.layers[1].attn.wq_b.weight.dtype == torch.float8_e4m3fn
    assert model.layers[1].ffn.experts.w1.dtype == torch.float8_e4m3fn
    assert model.layers[1].ffn.experts.w1_scale.shape == (8, 1, 1)
    assert model.head.weight.dtype == torch.float32 and model.layers[1].ffn.gate.bias.dtype == torch.float32
    assert not any(p.is_meta for p in model.parameters())


def test_weight_bytes_count_touched_experts(tmp_path):
    args = ModelArgs.from_hf_config(tiny_fp8_config(tmp_path))
    model = random_model(args, torch.float32, torch.device("cpu"))
    expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    embed_row = args.dim * 4
    other = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if ".experts." not in n and n != "embed.weight")
    e, k = args.n_routed_experts, args.n_activated_experts
    for batch in (1, 2, 64):
        touched = 1 - (1 - k / e) ** batch
        assert weight_bytes_per_step(model, args, batch) == pytest.approx(
            other + expert_bytes * touched + embed_row * batch, abs=64)   # whole bytes per tensor


def test_layer_cut_keeps_one_dense_layer():
    """--layers N: one dense layer (V3 has three) and N - 1 MoE layers, the slice spec/anchors.md measures;
    V2-Lite's single dense layer stays; the whole model keeps its own count."""
    assert bench_config("v3")["first_k_dense_replace"] == 3
    cut = bench_config("v3", 4)
    assert (cut["num_hidden_layers"], cut["first_k_dense_replace"]) == (4, 1)
    assert bench_config("v2-lite", 2)["first_k_dense_replace"] == 1
    args = ModelArgs.from_hf_config(bench_config("v3", 4))
    assert [args.is_moe_layer(i) for i in range(4)] == [False, True, True, True]


def test_bench_cli_runs_on_cpu(tmp_path, capsys):
    tiny_fp8_config(tmp_path)
    assert main(["bench", "--config", str(tmp_path), "--batch", "1", "3", "--decode-steps", "2",
                 "--prefill-len", "40", "24", "--prompt-len", "8", "--device", "cpu", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "time to first token" in out
    assert "(40-token prompt)" in out and "(24-token prompt)" in out     # one prefill line per length
    rows = [line for line in out.splitlines() if line.startswith("| 1 |") or line.startswith("| 3 |")]
    assert len(rows) == 2


@pytest.mark.parametrize("argv, message", [
    (["--config", "v9"], "--config must be one of v3, v2-lite"),
    (["--config", "v3", "--layers", "0"], "--layers must be in [1, 61]"),
    (["--batch", "0"], "--batch sizes must be at least 1"),
])
def test_bench_errors(argv, message, capsys):
    assert main(["bench", "--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err


def test_named_configs_parse():
    for name, layers in (("v2-lite", None), ("v3", 4)):
        args = ModelArgs.from_hf_config(bench_config(name, layers))
        assert args.n_layers == (layers or 27)
    assert ModelArgs.from_hf_config(bench_config("v3", 4)).n_dense_layers == 1


# --- DeepSeek-V4 --------------------------------------------------------------------------------------------------

def tiny_v4_config(tmp_path):
    """V4-Flash's published config at reduced width (CSA, HCA at rate 8, hash layers), quantized as released."""
    from dsinfer.models.published import V4_FLASH
    cfg = dict(V4_FLASH, vocab_size=320, hidden_size=256, moe_intermediate_size=128, num_hidden_layers=4,
               num_attention_heads=4, head_dim=128, q_lora_rank=128, o_groups=2, o_lora_rank=64, n_routed_experts=8,
               num_experts_per_tok=2, compress_ratios=[0, 4, 8, 4, 0], sliding_window=16, index_n_heads=4,
               index_head_dim=64, index_topk=4, max_position_embeddings=4096,
               rope_scaling=dict(type="yarn", factor=16, original_max_position_embeddings=256, beta_fast=32,
                                 beta_slow=1))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return cfg


def test_v4_flash_named_config_parses():
    from dsinfer.models.args_v4 import ModelArgsV4
    a = ModelArgsV4.from_hf_config(bench_config("v4-flash", 4))
    assert (a.n_layers, a.dim, a.n_routed_experts, a.n_activated_experts, a.moe_inter_dim) == (4, 4096, 256, 6, 2048)
    assert a.compress_ratios == (0, 0, 4, 128) and a.hash_layers == (True, True, True, False)
    assert a.quant is not None and ModelArgsV4.from_hf_config(bench_config("v4-flash")).n_layers == 43


def test_random_v4_model_is_in_the_published_formats(tmp_path):
    from dsinfer.bench import random_model_v4
    from dsinfer.models.args_v4 import ModelArgsV4
    from dsinfer.models.moe import set_moe_backend
    tiny_v4_config(tmp_path)
    args = ModelArgsV4.from_hf_config(bench_config(str(tmp_path)))
    model = random_model_v4(args, torch.float32, torch.device("cpu"))
    assert not any(p.is_meta for p in model.parameters())
    layer = model.layers[1]
    for lin in (layer.attn.wq_a, layer.attn.wq_b, layer.attn.wkv, layer.attn.wo_a, layer.attn.wo_b,
                layer.attn.indexer.wq_b, layer.ffn.shared_experts.w2):
        assert lin.weight.dtype == torch.float8_e4m3fn and lin.scale.dtype == torch.float32
    assert layer.attn.wq_b.scale.shape == (4 * 128 // 128, 1)
    assert layer.attn.compressor.wkv.weight.dtype == torch.float32 and model.head.scale is None
    e = layer.ffn.experts
    assert e.fmt == "fp4" and e.w1.shape == (8, 128, 128) and e.w2.shape == (8, 256, 64)
    assert e.w1_scale.dtype == torch.uint8 and e.w2_scale.shape == (8, 256, 4)
    tid2eid = model.layers[0].ffn.gate.tid2eid
    assert all(len(set(row)) == 2 for row in tid2eid.tolist())                # distinct experts per token
    assert model.layers[0].attn_norm.weight.eq(1).all()
    packed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert packed == 4 * 8 * 3 * (128 * 256 // 2 + 128 * 256 // 32)          # bytes: codes + scale bytes
    assert weight_bytes_per_step(model, args, 1000) == pytest.approx(
        sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n != "embed.weight")
        + args.dim * 4 * 320, rel=1e-6)                                       # every expert, every row touched
    # the random FP4 experts are valid weights for both MoE paths
    x, ids = torch.randn(5, args.dim), torch.arange(5)
    want = layer.ffn(x, ids)
    set_moe_backend(model, "triton")
    torch.testing.assert_close(layer.ffn(x, ids), want, rtol=1e-4, atol=1e-5)
    assert want.abs().max() > 0


def test_bench_cli_runs_v4_on_cpu(tmp_path, capsys):
    tiny_v4_config(tmp_path)
    assert main(["bench", "--config", str(tmp_path), "--layers", "3", "--batch", "1", "3", "--decode-steps", "2",
                 "--prefill-len", "40", "--prompt-len", "8", "--device", "cpu", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "deepseek_v4, 3 layers" in out and "fp4 experts" in out and "prefill:" in out
    rows = [line for line in out.splitlines() if line.startswith("| 1 |") or line.startswith("| 3 |")]
    assert len(rows) == 2
