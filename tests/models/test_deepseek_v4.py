"""DeepSeek-V4 against HF transformers' DeepseekV4ForCausalLM (the oracle; QAT simulation off, as HF has none)
on the tiny spec-section-6 model: sliding, CSA (indexer top-4 of up to 17 entries) and HCA layers, a hash-routed
layer, window 16. Prompts of 70 tokens cross four windows and many compression boundaries."""

import math
import subprocess
import sys

import fixtures
import pytest
import torch
from safetensors.torch import load_file, save_file

from dsinfer import LLM, SamplingParams
from dsinfer.checkpoint.loader_v4 import load_model_v4
from dsinfer.models.v4_state import V4State

CPU = torch.device("cpu")


def prompt(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [0] + torch.randint(7, fixtures.VOCAB, (n - 1,), generator=g).tolist()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def run(model, chunks: list[list[int]], state: V4State | None = None) -> torch.Tensor:
    """Feed one sequence chunk by chunk; logits at every position."""
    state = state or model.new_state()
    with torch.no_grad():
        return torch.cat([model.compute_logits(model(torch.tensor(c), [state], [len(c)])) for c in chunks])


@pytest.fixture(scope="module")
def hf():
    return fixtures.build_hf_model("v4")


@pytest.fixture(scope="module")
def ours(checkpoint):
    return load_model_v4(checkpoint("v4"), torch.float32, CPU, simulate_qat=False, progress=False)[0]


def test_logits_match_hf_fp32(hf, ours):
    ids = prompt(70)
    ref, got = hf_logits(hf, ids), run(ours, [ids])
    assert got.shape == (70, fixtures.VOCAB)
    assert (got - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    assert ours.layers[1].attn.indexer is not None and ours.layers[2].attn.indexer is None
    assert ours.layers[0].ffn.gate.hash and not ours.layers[1].ffn.gate.hash


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_cached_decode_and_chunked_prefill_equal_full_recompute(ours, chunk):
    ids = prompt(41, 1)
    full = run(ours, [ids])
    stepped = run(ours, [ids[i:i + chunk] for i in range(0, len(ids), chunk)])
    assert (stepped - full).abs().max().item() < 1e-5 * full.abs().max().item()


def test_greedy_matches_hf(hf, checkpoint):
    llm = LLM(checkpoint("v4"), device="cpu", dtype="float32", progress=False, simulate_qat=False)
    prompts = [prompt(5, 2), prompt(29, 3)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=24, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(p):].tolist()
        assert out.token_ids == ref and out.finish_reason == "length"


def test_ragged_batch_equals_each_alone(ours):
    """Three sequences in one forward pass, then decoded together; one joins late (prefill beside decodes)."""
    prompts = [prompt(1, 4), prompt(17, 5), prompt(40, 6)]
    cont = [prompt(9, 7 + i)[1:] for i in range(3)]
    alone = [run(ours, [p + c]) for p, c in zip(prompts, cont)]
    states = [ours.new_state() for _ in prompts]
    rows: list[list[torch.Tensor]] = [[], [], []]
    with torch.no_grad():
        def step(which, chunks):
            h = ours(torch.tensor([t for c in chunks for t in c]), [states[i] for i in which], [len(c) for c in chunks])
            logits, start = ours.compute_logits(h), 0
            for i, c in zip(which, chunks):
                rows[i].append(logits[start:start + len(c)])
                start += len(c)
        step([0, 1], [prompts[0], prompts[1]])
        step([0, 1, 2], [[cont[0][0]], [cont[1][0]], prompts[2]])
        for k in range(1, 8):
            step([0, 1, 2], [[cont[0][k]], [cont[1][k]], [cont[2][k - 1]]])
        step([2], [[cont[2][7]]])
    for i in range(3):
        assert (torch.cat(rows[i]) - alone[i]).abs().max().item() < 1e-5 * alone[i].abs().max().item()


def test_published_format_loads_to_the_same_logits(tmp_path):
    """Reference names, FP8 linears with E8M0 block scales, FP4 experts, int32 tid2eid, an mtp.0 block: loads
    quantized, and gives the logits of HF running the dequantized weights."""
    model = fixtures.build_hf_model("v4", seed=1)
    fixtures.write_published_v4(model, tmp_path / "pub")             # model now holds the dequantized weights
    ours = load_model_v4(tmp_path / "pub", torch.float32, CPU, simulate_qat=False, progress=False)[0]
    layer = ours.layers[1]
    assert layer.ffn.experts.w1.dtype == torch.uint8 and layer.ffn.experts.w1.shape == (8, 128, 128)
    assert layer.ffn.experts.w2_scale.dtype == torch.uint8 and layer.ffn.experts.w2_scale.shape == (8, 256, 4)
    assert layer.attn.wq_b.weight.dtype == torch.float8_e4m3fn and layer.attn.wq_b.scale.dtype == torch.float32
    assert layer.attn.indexer.wq_b.weight.dtype == torch.float8_e4m3fn
    assert layer.ffn.shared_experts.w2.weight.dtype == torch.float8_e4m3fn
    ids = prompt(50, 8)
    ref = hf_logits(model, ids)
    assert (run(ours, [ids]) - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def _representable(x: torch.Tensor, block: int, fmt: str) -> bool:
    """Each block of x is (an e4m3 / e2m1 value) * (one power of two)."""
    blocks = x.float().reshape(-1, block)
    amax = blocks.abs().amax(-1, keepdim=True).clamp(min=1e-30)
    s = torch.exp2(torch.ceil(torch.log2(amax / (448 if fmt == "fp8" else 6))))
    v = blocks / s
    if fmt == "fp8":
        return torch.equal(v.to(torch.float8_e4m3fn).float(), v)
    return bool(torch.isin(v.abs(), fixtures.E2M1).all())


def test_qat_simulation_is_on_by_default_and_rounds_like_the_reference(checkpoint, hf, ours):
    model = load_model_v4(checkpoint("v4"), torch.float32, CPU, progress=False)[0]
    assert model.simulate_qat and not ours.simulate_qat
    ids = prompt(70, 9)
    state = model.new_state()
    on = run(model, [ids], state)
    ref = hf_logits(hf, ids)
    assert (on - ref).abs().max().item() > 1e-3                     # it changes the numbers ...
    assert (on.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.5   # ... but not the model
    nope = model.args.nope_head_dim
    for layer in state.layers:
        assert _representable(layer.window[:, :nope], 64, "fp8")
        assert not _representable(layer.window[:, nope:], 64, "fp8")      # the rotary dims stay unrounded
        if layer.compressor is not None:
            assert _representable(layer.compressor.entries[:, :nope], 64, "fp8")
        if layer.indexer is not None:
            assert _representable(layer.indexer.entries, 32, "fp4")
    model.set_simulate_qat(False)
    assert (run(model, [ids]) - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_llm_sampling_is_seeded_and_chat_runs(checkpoint):
    llm = LLM(checkpoint("v4"), device="cpu", dtype="float32", progress=False)
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=12, seed=5, ignore_eos=True)
    a = llm.generate(["The quick brown fox", "Hello"], params)
    b = llm.generate(["The quick brown fox"], params)
    assert a[0].token_ids == b[0].token_ids and len(a[1].token_ids) == 12
    stopped = llm.generate("The quick", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                       stop=[a[0].text[:1] or "x"]))
    assert stopped[0].finish_reason in ("stop", "length")
    logits = llm.logits(prompt(20, 10))
    assert logits.shape == (20, fixtures.VOCAB)
    with pytest.raises(ValueError, match="simulate_qat"):
        LLM(checkpoint("v3"), device="cpu", dtype="float32", progress=False, simulate_qat=False)


def test_cli_generate_on_v4(checkpoint):
    llm = LLM(checkpoint("v4"), device="cpu", dtype="float32", progress=False, simulate_qat=False)
    want = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].text
    r = subprocess.run([sys.executable, "-m", "dsinfer", "generate", "--model", str(checkpoint("v4")), "--device",
                        "cpu", "--dtype", "float32", "--prompt", "Hello world", "--temperature", "0",
                        "--max-new-tokens", "8", "--no-simulate-qat"], capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr
    # generation stops at EOS if the random model samples it; the greedy text is a prefix of the ignore-EOS one
    assert want.startswith(r.stdout.rstrip("\n").removeprefix("Hello world"))


@pytest.mark.parametrize("edit,message", [
    ("drop", "missing 1 tensor"),
    ("extra", "does not use"),
    ("reshape", "has shape"),
    ("scale", "scale"),
])
def test_checkpoint_errors_are_one_line_value_errors(tmp_path, checkpoint, edit, message):
    src = checkpoint("v4")
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    t = load_file(src / "model.safetensors")
    name = "model.layers.1.attn.wq_a.weight"
    if edit == "drop":
        del t[name]
    elif edit == "extra":
        t["model.layers.1.attn.bogus.weight"] = torch.zeros(2)
    elif edit == "reshape":
        t[name] = t[name][:, :-1].contiguous()
    else:
        t["model.layers.1.attn.wq_a.weight_scale_inv"] = torch.ones(1, 2)
    save_file(t, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message) as e:
        load_model_v4(tmp_path, torch.float32, CPU, progress=False)
    assert "\n" not in str(e.value) and not math.isnan(len(str(e.value)))
