"""The V2/V3 model against HF transformers (the oracle) on tiny random checkpoints, and its fast paths
against its own naive paths: absorbed vs naive MLA, cached decode vs full recompute, batched vs alone."""

import json

import fixtures
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3ForCausalLM

from dsinfer import LLM, SamplingParams
from dsinfer.engine import Sequence

NAMES = ["v2-lite", "v2", "v3"]


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def prompt(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [0] + torch.randint(7, fixtures.VOCAB, (n - 1,), generator=g).tolist()


@pytest.fixture(scope="module")
def llm32(checkpoint):
    cache = {}

    def get(name, **kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = LLM(checkpoint(name), device="cpu", dtype="float32", progress=False, **kw)
        return cache[key]
    return get


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_hf_fp32(name, llm32):
    hf = fixtures.build_hf_model(name)
    ids = prompt(40)
    llm = llm32(name)
    ours = llm.logits(ids)
    ref = hf_logits(hf, ids)
    assert ours.shape == (40, fixtures.VOCAB)
    assert (ours - ref).abs().max().item() < 1e-4
    assert llm.engine.model.layers[0].attn.wqkv_a is not None     # the engine's one GEMM for wq_a/wq and wkv_a


@pytest.mark.parametrize("name", NAMES)
def test_greedy_32_tokens_match_hf(name, llm32):
    hf = fixtures.build_hf_model(name)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    prompts = [prompt(5, 1), prompt(23, 2)]
    outs = llm32(name).generate(prompts, params)
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=32, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(p):].tolist()
        assert out.token_ids == ref
        assert out.finish_reason == "length"


@pytest.mark.parametrize("name", NAMES)
def test_bf16_close_to_hf(name, checkpoint):
    """bf16 rounding flips near-tied routing decisions in these random models, so the yardstick is HF's own
    bf16 run: measured against the fp32 oracle, ours must be about as close as HF bf16 is."""
    hf = fixtures.build_hf_model(name)
    ids = prompt(48, 3)
    ref = hf_logits(hf, ids)
    hf16 = fixtures.build_hf_model(name).to(torch.bfloat16)
    for m in hf16.modules():                       # keep the correction bias in fp32, as from_pretrained does
        if hasattr(m, "e_score_correction_bias"):
            m.e_score_correction_bias.data = m.e_score_correction_bias.data.float()
    theirs = hf_logits(hf16, ids)
    ours = LLM(checkpoint(name), device="cpu", dtype="bfloat16", progress=False).logits(ids)

    def agreement(x):
        return (x.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert (ours - ref).abs().mean().item() <= 1.5 * (theirs - ref).abs().mean().item() + 5e-3
    assert agreement(ours) >= min(0.85, agreement(theirs) - 0.05)


@pytest.mark.parametrize("name", NAMES)
def test_absorbed_equals_naive(name, llm32):
    ids = prompt(30, 4)
    a = llm32(name).logits(ids)
    n = llm32(name, attn_impl="naive").logits(ids)
    assert (a - n).abs().max().item() < 2e-5


@pytest.mark.parametrize("name", ["v2-lite", "v3"])
def test_cached_decode_equals_full_recompute(name, llm32):
    llm = llm32(name)
    ids = prompt(11, 5)
    cont = llm.generate([ids], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].token_ids
    full = llm.logits(ids + cont)                                         # one pass over everything
    eng = llm.engine
    seq = Sequence(-1, list(ids), len(ids), SamplingParams(max_tokens=len(cont)), eng.max_model_len)
    assert eng.block_manager.ensure(seq, len(ids) + len(cont))
    try:
        steps = [eng.runner.run([seq], [len(ids)])]
        seq.num_cached_tokens = len(ids)
        for t in cont[:-1]:
            seq.token_ids.append(t)
            steps.append(eng.runner.run([seq], [1]))
            seq.num_cached_tokens += 1
    finally:
        eng.block_manager.release(seq)
    stepped = torch.cat(steps)
    assert (stepped - full[len(ids) - 1:-1]).abs().max().item() < 1e-4
    assert stepped.argmax(-1).tolist() == cont


@pytest.mark.parametrize("chunk", [4096, 7])
def test_batch_of_different_lengths_equals_each_alone(chunk, checkpoint):
    llm = LLM(checkpoint("v3"), device="cpu", dtype="float32", progress=False, max_num_batched_tokens=chunk,
              page_size=4)
    prompts = [prompt(n, n) for n in (1, 3, 17, 40, 9)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    together = [o.token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    assert together == alone
    assert llm.engine.block_manager.num_free_pages == llm.engine.block_manager.num_pages


# --- FP8 checkpoints in the published format --------------------------------------------------------------

def quantize_block(w: torch.Tensor, block: int = 128):
    """Test-side FP8 quantizer: per (block x block) tile, scale = amax / 448, q = e4m3(w / scale)."""
    n, k = w.shape
    s = torch.empty(-(-n // block), -(-k // block))
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            s[i, j] = tile.abs().max().clamp(min=1e-4) / 448
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def dequantize_block(q, s, block: int = 128):
    n, k = q.shape
    w = torch.empty(n, k)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            w[i * block:(i + 1) * block, j * block:(j + 1) * block] = \
                q[i * block:(i + 1) * block, j * block:(j + 1) * block].float() * s[i, j]
    return w


def test_fp8_checkpoint_matches_hf_on_dequantized_weights(tmp_path):
    """Dimensions 200, 320, 160, 144, 136 make ragged edge blocks everywhere."""
    name = "v3-fp8"
    fixtures.CONFIGS[name] = ("deepseek_v3", dict(fixtures.CONFIGS["v3"][1], hidden_size=200, intermediate_size=320,
                                                  moe_intermediate_size=160, kv_lora_rank=144, q_lora_rank=136,
                                                  qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32))
    fp8_dir, ref_dir = tmp_path / "fp8", tmp_path / "dequantized"
    fixtures.build_hf_model(name).save_pretrained(ref_dir)
    fixtures.build_hf_model(name).save_pretrained(fp8_dir)
    fixtures.write_tokenizer(fp8_dir)
    tensors = load_file(fp8_dir / "model.safetensors")
    out = {}
    n_quantized = 0
    for k, v in tensors.items():
        if k.endswith("_proj.weight") or k.endswith("_proj_with_mqa.weight"):
            q, s = quantize_block(v)
            out[k], out[k + "_scale_inv"] = q, s
            tensors[k] = dequantize_block(q, s)          # what HF will run with
            n_quantized += 1
        else:
            out[k] = v
    assert n_quantized > 30
    save_file(out, fp8_dir / "model.safetensors", metadata={"format": "pt"})
    save_file(tensors, ref_dir / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((fp8_dir / "config.json").read_text())
    cfg["quantization_config"] = dict(activation_scheme="dynamic", fmt="e4m3", quant_method="fp8",
                                      weight_block_size=[128, 128])
    (fp8_dir / "config.json").write_text(json.dumps(cfg))
    hf = DeepseekV3ForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()

    llm = LLM(fp8_dir, device="cpu", dtype="float32", progress=False)
    wq_b = llm.engine.model.layers[1].attn.wq_b
    assert wq_b.weight.dtype == torch.float8_e4m3fn and wq_b.scale.shape == (2, 2)   # stays FP8 in memory
    assert llm.engine.model.layers[1].ffn.experts.w1.dtype == torch.float8_e4m3fn
    ids = prompt(33, 6)
    assert (llm.logits(ids) - hf_logits(hf, ids)).abs().max().item() < 1e-4
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=16, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(ids):].tolist()
    assert llm.generate([ids], params)[0].token_ids == ref


def test_mtp_layer_is_recognised_and_skipped(tmp_path, checkpoint, llm32):
    """A V3 checkpoint carries its MTP layer at index num_hidden_layers; loading ignores it."""
    src = checkpoint("v3")
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    n = fixtures.CONFIGS["v3"][1]["num_hidden_layers"]
    mtp = {k.replace("model.layers.1.", f"model.layers.{n}."): v.clone() for k, v in tensors.items()
           if k.startswith("model.layers.1.")}
    d = fixtures.CONFIGS["v3"][1]["hidden_size"]
    mtp.update({f"model.layers.{n}.enorm.weight": torch.ones(d), f"model.layers.{n}.hnorm.weight": torch.ones(d),
                f"model.layers.{n}.eh_proj.weight": torch.randn(d, 2 * d),
                f"model.layers.{n}.shared_head.norm.weight": torch.ones(d),
                f"model.layers.{n}.shared_head.head.weight": tensors["lm_head.weight"].clone(),
                f"model.layers.{n}.embed_tokens.weight": tensors["model.embed_tokens.weight"].clone()})
    save_file({**tensors, **mtp}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids = prompt(12, 7)
    ours = LLM(tmp_path, device="cpu", dtype="float32", progress=False).logits(ids)
    assert torch.equal(ours, llm32("v3").logits(ids))
