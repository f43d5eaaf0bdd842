"""`dsinfer bench`: random-weight models of a config's shapes (FP8 where the config says so) run through the
engine; the weight-bytes count follows spec/anchors.md."""

import json

import pytest
import torch

import fixtures
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


def test_bench_cli_runs_on_cpu(tmp_path, capsys):
    tiny_fp8_config(tmp_path)
    assert main(["bench", "--config", str(tmp_path), "--batch", "1", "3", "--decode-steps", "2",
                 "--prefill-len", "40", "--prompt-len", "8", "--device", "cpu", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "time to first token" in out and "prefill:" in out
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
    assert ModelArgs.from_hf_config(bench_config("v3", 4)).n_dense_layers == 3
