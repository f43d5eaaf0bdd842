"""Loading one rank's part of a model: from a Hugging Face folder (slices read straight from the safetensors)
and from a `dsinfer convert --tp 2` rank file, each rank's parameters equal the slices `convert` writes (an
oracle tested against hand-written slicing in test_convert.py); routed experts are the rank's own; FP8 scales
split with their weights; bad sizes are one-line ValueErrors. No process group is needed: loading has no
collectives."""

import fixtures
import pytest
import torch
from safetensors.torch import load_file

from dsinfer.checkpoint import cast_checkpoint, convert_checkpoint, load_model
from dsinfer.checkpoint.names import hf_to_native
from dsinfer.parallel import ParallelState

TP = 2


def rank_model(path, rank, dtype=torch.float32):
    model, _ = load_model(path, dtype, torch.device("cpu"), progress=False,
                          parallel=ParallelState(rank, TP))
    return model


def check_rank(model, rank_file, n_layers):
    """Every parameter of the rank's model holds exactly what `convert` put into that rank's file."""
    params = dict(model.named_parameters())
    seen = set()
    for hf_name, tensor in load_file(rank_file).items():
        t = hf_to_native(hf_name, n_layers)
        if t is None:
            continue
        p = params[t.name]
        if t.expert is not None:
            experts = model.get_submodule(t.name.rpartition(".")[0])
            p = p[t.expert - experts.first]
        if tensor.dtype == torch.float8_e4m3fn:
            assert p.dtype == tensor.dtype and torch.equal(p.view(torch.uint8), tensor.view(torch.uint8)), hf_name
        else:
            assert torch.equal(p, tensor.to(p.dtype)), hf_name
        seen.add(t.name)
    assert seen == set(params)


@pytest.mark.parametrize("name", ["v2-lite", "v3"])
def test_rank_parts_equal_convert_slices(name, checkpoint, tmp_path):
    src = checkpoint(name)
    out = convert_checkpoint(src, tmp_path / "tp", TP, progress=False)
    n_layers = fixtures.CONFIGS[name][1]["num_hidden_layers"]
    for rank in range(TP):
        from_hf = rank_model(src, rank)
        assert from_hf.layers[0].attn.n_heads == 2 and from_hf.embed.weight.shape == (fixtures.VOCAB // 2, 64)
        experts = from_hf.layers[1].ffn.experts
        assert (experts.first, experts.n_local, experts.w1.shape[0]) == (4 * rank, 4, 4)
        check_rank(from_hf, out / f"model{rank}-mp{TP}.safetensors", n_layers)
        check_rank(rank_model(out, rank), out / f"model{rank}-mp{TP}.safetensors", n_layers)


def test_fp8_scales_split_on_block_boundaries(tmp_path):
    fp8 = fixtures.write_fp8_wide(tmp_path)
    out = convert_checkpoint(fp8, tmp_path / "tp2", TP, progress=False)
    for rank in range(TP):
        model = rank_model(fp8, rank, torch.bfloat16)
        assert model.layers[1].attn.wo.scale.shape == (2, 1)             # (256 / 128, 256 / 2 / 128)
        check_rank(model, out / f"model{rank}-mp{TP}.safetensors", 3)


def test_fp8_blocks_that_would_be_cut(checkpoint, tmp_path):
    fp8 = cast_checkpoint(checkpoint("v3"), tmp_path / "fp8", "fp8", progress=False)
    with pytest.raises(ValueError) as e:
        rank_model(fp8, 0, torch.bfloat16)
    message = str(e.value)
    assert "tensor-parallel size 2 cannot split model.layers." in message
    assert "whole FP8 blocks of 128; allowed sizes: 1" in message and "\n" not in message


def test_converted_folder_for_another_size(checkpoint, tmp_path):
    out = convert_checkpoint(checkpoint("v3"), tmp_path / "tp4", 4, progress=False)
    with pytest.raises(ValueError, match=r"converted for --tp 4, but this run has --tp 2"):
        rank_model(out, 1)
