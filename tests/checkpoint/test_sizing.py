"""`dsinfer inspect`: parameter counts against a hand count from the config fields (and against the sum of numel
over the safetensors), the published V3 / V2-Lite figures from config.json alone, weights per rank against what
`convert` actually writes, and the fit arithmetic."""

import json

import pytest
from safetensors.torch import load_file

from dsinfer.checkpoint import convert_checkpoint, format_sizing, inspect_checkpoint
from dsinfer.checkpoint.sizing import RESERVE_FRACTION, GiB
from dsinfer.cli import main
from dsinfer.models.published import V2_LITE, V3


def hand_count(c: dict) -> dict:
    """Parameters from the config fields: main total, active per token (no embedding table), one MTP layer."""
    D, V, L, H, k_dense = (c["hidden_size"], c["vocab_size"], c["num_hidden_layers"], c["num_attention_heads"],
                           c["first_k_dense_replace"])
    nope, rope, v, kvl, ql = (c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"],
                              c.get("q_lora_rank") or 0)
    E, k, mi, ns = c["n_routed_experts"], c["num_experts_per_tok"], c["moe_intermediate_size"], c["n_shared_experts"]
    q = D * ql + ql + ql * H * (nope + rope) if ql else D * H * (nope + rope)
    attn = q + D * (kvl + rope) + kvl + kvl * H * (nope + v) + H * v * D
    bias = E if c.get("topk_method", "noaux_tc") == "noaux_tc" and c["model_type"] == "deepseek_v3" else 0
    expert = 3 * D * mi
    moe = E * D + bias + E * expert + 3 * D * ns * mi
    dense = 3 * D * c["intermediate_size"]
    total = 2 * V * D + D + L * (attn + 2 * D) + k_dense * dense + (L - k_dense) * moe
    active = total - V * D - (L - k_dense) * (E - k) * expert
    mtp = c.get("num_nextn_predict_layers", 0) * (attn + 2 * D + moe + 3 * D + 2 * D * D + 2 * V * D)
    return dict(total=total, active=active, mtp=mtp)


def write_config(path, cfg):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("name", ["v2-lite", "v2", "v3"])
def test_tiny_fixtures_match_hand_count_and_safetensors(name, checkpoint, tmp_path):
    path = checkpoint(name)
    cfg = json.loads((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    want = hand_count(cfg)
    assert sum(t.numel() for t in tensors.values()) == want["total"]
    s = inspect_checkpoint(path)
    assert (s.total_params, s.active_params, s.mtp_params) == (want["total"], want["active"], 0)
    assert s.bytes_by_dtype == {"F32": sum(t.numel() * 4 for t in tensors.values())}
    assert s.source.startswith("safetensors headers")
    # The same numbers from config.json alone (it also declares the MTP layer the HF save leaves out).
    c = inspect_checkpoint(write_config(tmp_path / "cfg", cfg))
    assert (c.total_params, c.active_params, c.mtp_params) == (want["total"], want["active"], want["mtp"])
    assert c.bytes_by_dtype == s.bytes_by_dtype and c.source.startswith("config.json only")
    assert "sizes match no release" in c.version


def test_published_v3_from_config_alone(tmp_path):
    want = hand_count(V3)
    assert want == dict(total=671_026_419_200, active=36_625_618_432, mtp=13_463_426_304)
    s = inspect_checkpoint(write_config(tmp_path / "v3", V3))
    assert (s.total_params, s.active_params, s.mtp_params) == tuple(want.values())
    assert round(s.total_params / 1e9) == 671 and round(s.active_params / 1e9) == 37
    # DeepSeek quotes "685B = 671B + 14B of MTP"; the stored MTP layer (with its own embedding and head
    # copies) counts 13.46B, and 671.03 + 13.46 = 684.5.
    assert abs(s.mtp_params / 1e9 - 14) < 0.6
    assert s.kv_bytes_per_token == (512 + 64) * 61 * 2 == 70_272
    assert set(s.bytes_by_dtype) == {"F8_E4M3", "BF16", "F32"}
    # FP8: everything but the embedding, the head, the norms (q_a / kv_a norms included) and the router.
    assert s.bytes_by_dtype["F8_E4M3"] == s.total_params - 2 * 129280 * 7168 - 61 * (1536 + 512) - sum(
        n for c, n in s.params.items() if c in ("norms", "router"))
    assert "deepseek_v3 family" in s.version and "R1" in s.version
    v31 = dict(V3, quantization_config=dict(V3["quantization_config"], scale_fmt="ue8m0"))
    assert "V3.1" in inspect_checkpoint(write_config(tmp_path / "v31", v31)).version
    bf16 = {k: v for k, v in V3.items() if k != "quantization_config"}
    s16 = inspect_checkpoint(write_config(tmp_path / "bf16", bf16))
    assert "cannot be told apart" in s16.version and set(s16.bytes_by_dtype) == {"BF16", "F32"}


def test_published_v2_lite_from_config_alone(tmp_path):
    want = hand_count(V2_LITE)
    assert want == dict(total=15_706_484_224, active=2_451_435_008, mtp=0)
    s = inspect_checkpoint(write_config(tmp_path / "v2l", V2_LITE))
    assert (s.total_params, s.active_params, s.mtp_params) == tuple(want.values())
    # DeepSeek quotes 15.7B total and 2.4B activated (2.45B, truncated).
    assert round(s.total_params / 1e8) == 157 and int(s.active_params / 1e8) == 24
    assert s.bytes_by_dtype == {"BF16": 2 * s.total_params}
    assert "V2-Lite" in s.version


def test_weights_per_rank_equal_convert_output(checkpoint, tmp_path):
    src = checkpoint("v3")
    out = convert_checkpoint(src, tmp_path / "tp2", 2, progress=False)
    rank_bytes = [sum(t.numel() * t.element_size() for t in load_file(out / f"model{r}-mp2.safetensors").values())
                  for r in range(2)]
    assert rank_bytes[0] == rank_bytes[1]
    s = inspect_checkpoint(src, gpus=2, gpu_mem_gib=0.01, context=100)
    f = s.fit
    assert f.weights_per_rank == rank_bytes[0]
    mem = int(0.01 * GiB)
    assert f.reserve == int(mem * RESERVE_FRACTION)
    assert f.max_tokens == (mem - f.reserve - rank_bytes[0]) // s.kv_bytes_per_token
    assert f.max_batch == f.max_tokens // 100
    converted = inspect_checkpoint(out)                 # a convert output reads as the whole model
    assert (converted.total_params, converted.bytes_by_dtype) == (s.total_params, s.bytes_by_dtype)


def test_v3_fit_on_gpus(tmp_path, capsys):
    path = write_config(tmp_path / "v3", V3)
    s = inspect_checkpoint(path, gpus=8, gpu_mem_gib=80)
    assert s.fit.max_tokens == 0 and s.fit.min_gpus == 16
    assert "does NOT fit; it needs tp >= 16" in format_sizing(s)
    s = inspect_checkpoint(path / "config.json", gpus=8, gpu_mem_gib=139, context=32768)
    f = s.fit
    assert 0 < f.weights_per_rank < s.total_params / 8 * 1.1
    assert f.max_tokens == (139 * GiB - f.reserve - f.weights_per_rank) // 70_272
    assert f.max_context == min(f.max_tokens, 163840) and f.max_batch == f.max_tokens // 32768
    assert main(["inspect", "--model", str(path), "--gpus", "8", "--gpu-mem", "139", "--context", "32768"]) == 0
    out = capsys.readouterr().out
    assert "671,026,419,200" in out and "36,625,618,432" in out and f"{f.max_batch:,} sequences" in out


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "3", "--gpu-mem", "80"], "--gpus 3 does not divide num_attention_heads = 128"),
    (["--gpus", "8"], "--gpus and --gpu-mem go together"),
    (["--context", "100"], "--context needs --gpus"),
    (["--gpus", "8", "--gpu-mem", "80", "--context", "999999"], "--context must be in [1, 163840]"),
])
def test_cli_errors(argv, message, tmp_path, capsys):
    path = write_config(tmp_path / "v3", V3)
    assert main(["inspect", "--model", str(path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"dsinfer: error: {message}" or (err.startswith("dsinfer: error: ") and message in err)
    assert main(["inspect", "--model", str(tmp_path / "nothing")]) == 2
    assert "neither a config.json nor a folder" in capsys.readouterr().err
