"""`dsinfer cast` on DeepSeek-V4's published format (FP8 linears with E8M0 block scales, FP4 experts, scales in
another shard than their weights): FP4 -> FP8 repacking is bit-exact against the fixture's own decoders and the
result loads to the same logits; BF16 dequantizes exactly; refusals; a cast that would lose weights leaves no
folder behind."""

import json

import fixtures
import pytest
import torch
from safetensors.torch import load_file, save_file

from dsinfer.checkpoint import cast_checkpoint
from dsinfer.checkpoint.loader_v4 import load_model_v4
from dsinfer.cli import main
from dsinfer.models.moe import set_moe_backend

CPU = torch.device("cpu")
EXPERT = "layers.1.ffn.experts.3.w2"


def prompt(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [0] + torch.randint(7, fixtures.VOCAB, (n - 1,), generator=g).tolist()


def tensors_of(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def write_sharded(tensors, path, config):
    """Two shards: every scale in the second, so that weights and their scales live in different files."""
    path.mkdir()
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in tensors.items() if not k.endswith(".scale")},
              "model-00002-of-00002.safetensors": {k: v for k, v in tensors.items() if k.endswith(".scale")}}
    for name, part in shards.items():
        save_file(part, path / name, metadata={"format": "pt"})
    weight_map = {k: name for name, part in shards.items() for k in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))
    fixtures.write_tokenizer(path)
    return path


def logits(model, ids):
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(ids), [model.new_state()], [len(ids)]))


@pytest.fixture(scope="module")
def pub(tmp_path_factory):
    root = tmp_path_factory.mktemp("v4cast")
    fixtures.write_published_v4(fixtures.build_hf_model("v4", seed=2), root / "one")
    config = json.loads((root / "one" / "config.json").read_text())
    src = write_sharded(load_file(root / "one" / "model.safetensors"), root / "pub", config)
    return {"src": src, "fp8": cast_checkpoint(src, root / "fp8", "fp8", progress=False),
            "bf16": cast_checkpoint(src, root / "bf16", "bf16", progress=False)}


def e8m0_expand(s, shape, block):
    scale = torch.exp2(s.view(torch.uint8).double() - 127)
    return scale.repeat_interleave(block[0], 0)[:shape[0]].repeat_interleave(block[1], 1)[:, :shape[1]]


def test_fp4_experts_become_fp8_bit_exactly(pub):
    a, b = tensors_of(pub["src"]), tensors_of(pub["fp8"])
    assert set(a) == set(b)
    experts = [k for k in a if ".ffn.experts." in k and k.endswith(".weight")]
    assert len(experts) == 4 * 8 * 3
    for k in experts:
        s_name = k.removesuffix(".weight") + ".scale"
        q, s = b[k], b[s_name]
        assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
        assert q.shape == (a[k].shape[0], 2 * a[k].shape[1]) and s.shape == (q.shape[0] // 128, q.shape[1] // 128)
        want = fixtures.dequantize_fp4_e8m0(a[k], a[s_name]).double()
        got = q.double() * e8m0_expand(s, q.shape, (128, 128))
        assert torch.equal(got, want), k
        # the tile scale is the reference's: the largest 32-input scale of the tile, over 64
        tiles = a[s_name].view(torch.uint8).int().view(q.shape[0] // 128, 128, q.shape[1] // 128, 4)
        assert torch.equal(s.view(torch.uint8).int(), tiles.amax(dim=(1, 3)) - 6)
    for k in a:
        if k not in experts and k.removesuffix(".scale") + ".weight" not in experts:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8) if a[k].dtype.itemsize == 1
                                                            else a[k], b[k].view(torch.uint8)
                                                            if b[k].dtype.itemsize == 1 else b[k]), k
    cfg = json.loads((pub["fp8"] / "config.json").read_text())
    assert cfg["expert_dtype"] == "fp8" and cfg["quantization_config"]["weight_block_size"] == [128, 128]
    index = json.loads((pub["fp8"] / "model.safetensors.index.json").read_text())
    assert index["weight_map"][EXPERT + ".scale"] == index["weight_map"][EXPERT + ".weight"]
    assert (pub["fp8"] / "tokenizer.json").is_file()
    assert not list(pub["fp8"].parent.glob(".*dsinfer-partial"))


def test_fp8_cast_loads_to_the_same_logits(pub):
    src = load_model_v4(pub["src"], torch.float32, CPU, simulate_qat=False, progress=False)[0]
    fp8 = load_model_v4(pub["fp8"], torch.float32, CPU, simulate_qat=False, progress=False)[0]
    assert src.layers[1].ffn.experts.fmt == "fp4" and fp8.layers[1].ffn.experts.fmt == "fp8"
    assert fp8.layers[1].ffn.experts.w1_scale.shape == (8, 1, 2)
    for e in range(8):
        for w in ("w1", "w2", "w3"):
            assert torch.equal(src.layers[2].ffn.experts.weight(w, e, torch.float32),
                               fp8.layers[2].ffn.experts.weight(w, e, torch.float32))
    ids = prompt(24, 1)
    want = logits(src, ids)
    assert torch.equal(logits(fp8, ids), want)
    set_moe_backend(fp8, "triton")                              # FP8 experts through the fused kernel
    short = ids[:9]
    assert (logits(fp8, short) - want[:9]).abs().max().item() < 1e-4 * want.abs().max().item()


def test_bf16_cast_is_exact_and_loads_to_the_same_logits(pub):
    a, b = tensors_of(pub["src"]), tensors_of(pub["bf16"])
    assert set(b) == {k for k in a if not k.endswith(".scale")}
    n = 0
    for k, v in b.items():
        scale = k.removesuffix(".weight") + ".scale"
        if scale in a:
            want = (fixtures.dequantize_fp4_e8m0(a[k], a[scale]) if a[k].dtype == torch.int8
                    else fixtures.dequantize_fp8_e8m0(a[k], a[scale]))
            assert v.dtype == torch.bfloat16 and torch.equal(v.float(), want.float()), k
            n += 1
        else:
            assert v.dtype == a[k].dtype and torch.equal(v, a[k]), k
    assert n == 4 * (8 * 3 + 3 + 5) + 2 + 1      # experts, shared, attention; 2 indexer wq_b; mtp.0 wq_a
    cfg = json.loads((pub["bf16"] / "config.json").read_text())
    assert "quantization_config" not in cfg and "expert_dtype" not in cfg
    src = load_model_v4(pub["src"], torch.float32, CPU, simulate_qat=False, progress=False)[0]
    bf16 = load_model_v4(pub["bf16"], torch.float32, CPU, simulate_qat=False, progress=False)[0]
    assert bf16.layers[1].ffn.experts.fmt == "dense" and bf16.layers[1].attn.wq_b.scale is None
    ids = prompt(24, 2)
    want = logits(src, ids)
    assert (logits(bf16, ids) - want).abs().max().item() < 1e-5 * want.abs().max().item()
    # In bf16 too: the published checkpoint dequantizes to the very bf16 weights the cast wrote.
    lowp = [load_model_v4(pub[k], torch.bfloat16, CPU, simulate_qat=False, progress=False)[0] for k in ("src", "bf16")]
    a, b = (logits(m, ids) for m in lowp)
    assert (a - b).abs().max().item() < 1e-2 * a.abs().max().item()


def test_refusals(pub, tmp_path):
    with pytest.raises(ValueError, match="no FP4 experts"):
        cast_checkpoint(pub["fp8"], tmp_path / "x", "fp8", progress=False)
    with pytest.raises(ValueError, match="nothing to dequantize"):
        cast_checkpoint(pub["bf16"], tmp_path / "x", "bf16", progress=False)
    with pytest.raises(ValueError, match="scale-fmt"):
        cast_checkpoint(pub["src"], tmp_path / "x", "fp8", "ue8m0", progress=False)
    assert not (tmp_path / "x").exists()


def test_lossy_repacking_is_refused_and_leaves_nothing(pub, tmp_path):
    """One 32-input scale 20 binades above the rest of its tile: the tile's small values would fall below e4m3's
    range. The cast stops before anything named like the output exists."""
    tensors = tensors_of(pub["src"])
    s = tensors[EXPERT + ".scale"].view(torch.uint8).clone()
    s[0, 0] += 20
    tensors[EXPERT + ".scale"] = s.view(torch.float8_e8m0fnu)
    src = write_sharded(tensors, tmp_path / "src", json.loads((pub["src"] / "config.json").read_text()))
    with pytest.raises(ValueError, match="cast to bf16 instead"):
        cast_checkpoint(src, tmp_path / "out", "fp8", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert cast_checkpoint(src, tmp_path / "out", "bf16", progress=False).is_dir()    # bf16 is exact


def test_cli(pub, tmp_path, capsys):
    assert main(["cast", "--model", str(pub["src"]), "--out", str(tmp_path / "o"), "--to", "fp8"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["cast", "--model", str(tmp_path / "o"), "--out", str(tmp_path / "p"), "--to", "fp8"]) == 2
    assert "no FP4 experts" in capsys.readouterr().err
