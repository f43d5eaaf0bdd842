"""Tiny DeepSeek checkpoints built with HF transformers and saved as real HF checkpoint folders.

Configs follow the spec's section 6: a V2-Lite-like one (plain q_proj, softmax greedy, 2 shared experts), a
V2-like one (q_lora, softmax group-limited, route scale 16) and a V3-like one (sigmoid noaux_tc with groups,
q_lora, norm_topk_prob), YaRN active in each. Each folder also gets a small byte-level BPE tokenizer with
DeepSeek's special tokens and a V3-style chat template, so the whole API and CLI run on it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

VOCAB = 320
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
SPECIALS = [BOS, EOS, "<｜▁pad▁｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
# DeepSeek's V3 tool-call tokens (spec section 4), special as in the real tokenizers; the last ids of the vocabulary.
TOOL_TOKENS = ["<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
               "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>",
               "<｜tool▁sep｜>"]

# V3 template as described in the spec (section 4), with the V3.1 `thinking` switch.
V3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% if thinking is defined and thinking %}<think>"
    "{% elif thinking is defined %}</think>{% endif %}{% endif %}")
# R1: the generation prompt forces thinking.
R1_TEMPLATE = V3_TEMPLATE.split("{% if add_generation_prompt %}")[0] + \
    "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"

_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096,
             beta_fast=32, beta_slow=1)
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=1,
               kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
               max_position_embeddings=163840, bos_token_id=0, eos_token_id=1, initializer_range=0.1)

CONFIGS = {
    "v2-lite": ("deepseek_v2", dict(_COMMON, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, n_group=1,
                                    topk_group=1, topk_method="greedy", norm_topk_prob=False,
                                    routed_scaling_factor=1.0, q_lora_rank=None,
                                    rope_parameters=dict(_YARN, mscale=0.707, mscale_all_dim=0.707))),
    "v2": ("deepseek_v2", dict(_COMMON, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, n_group=4,
                               topk_group=2, topk_method="group_limited_greedy", norm_topk_prob=False,
                               routed_scaling_factor=16.0, q_lora_rank=48,
                               rope_parameters=dict(_YARN, mscale=0.707, mscale_all_dim=0.707))),
    "v3": ("deepseek_v3", dict(_COMMON, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
                               topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, q_lora_rank=48,
                               rope_parameters=dict(_YARN, mscale=1.0, mscale_all_dim=1.0), rope_interleave=True,
                               num_nextn_predict_layers=1)),
}
# Every split dim a multiple of 2 x 128, so FP8 scale blocks split whole at tp=2 (but not at tp=4).
CONFIGS["v3-wide"] = ("deepseek_v3", dict(
    CONFIGS["v3"][1], hidden_size=256, intermediate_size=256, moe_intermediate_size=256, q_lora_rank=128,
    kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64))


def build_hf_model(name: str, seed: int = 0):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM
    model_type, kwargs = CONFIGS[name]
    if model_type == "deepseek_v4":
        return build_hf_model_v4(kwargs, seed)
    cfg_cls, model_cls = ((DeepseekV2Config, DeepseekV2ForCausalLM) if model_type == "deepseek_v2"
                          else (DeepseekV3Config, DeepseekV3ForCausalLM))
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kwargs)).eval()
    if model_type == "deepseek_v3":                 # a non-zero correction bias, so that it matters for routing
        for layer in model.model.layers[kwargs["first_k_dense_replace"]:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(kwargs["n_routed_experts"]) * 0.1)
    return model


def write_tokenizer(path: Path, template: str = V3_TEMPLATE) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - len(TOOL_TOKENS), special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["The quick brown fox jumps over the lazy dog. " * 3, "To be, or not to be, that is the question.",
              "Hello world! Tensor parallel latent attention with mixture of experts.", "0123456789 +-*/=()"] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(TOOL_TOKENS)
    missing = VOCAB - tok.get_vocab_size(with_added_tokens=True)
    if missing > 0:
        tok.add_tokens([f"<extra_{i}>" for i in range(missing)])
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(dict(
        bos_token=BOS, eos_token=EOS, add_bos_token=True, add_eos_token=False,
        tokenizer_class="PreTrainedTokenizerFast", model_max_length=163840, chat_template=template)))


def write_checkpoint(name: str, path: Path, seed: int = 0) -> Path:
    """Save the tiny HF model `name` with its tokenizer to `path`; returns `path`."""
    model = build_hf_model(name, seed)
    model.save_pretrained(path)
    write_tokenizer(path)
    return path


def write_fp8_wide(path: Path) -> Path:
    """The "v3-wide" checkpoint cast to FP8 (128x128 blocks) under `path`/fp8 (the bf16 source in `path`/src)."""
    from dsinfer.checkpoint.cast import cast_checkpoint
    src = write_checkpoint("v3-wide", path / "src")
    return cast_checkpoint(src, path / "fp8", "fp8", progress=False)


# --- DeepSeek-V4 ------------------------------------------------------------------------------------------------
# Spec section 6's V4-Flash-like config: sliding, CSA (ratio 4, overlapping windows, indexer top-4 < entries),
# HCA (rate shrunk to 8) and a hash-routed first layer; window 16, so a 70-token prompt fills several windows.
V4 = dict(vocab_size=VOCAB, hidden_size=256, moe_intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
          num_key_value_heads=1, head_dim=128, qk_rope_head_dim=64, q_lora_rank=128, o_groups=2, o_lora_rank=64,
          n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, scoring_func="sqrtsoftplus",
          routed_scaling_factor=1.5, swiglu_limit=10.0, num_hash_layers=1,
          layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                       "compressed_sparse_attention"],
          compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
          sliding_window=16, index_n_heads=4, index_head_dim=64, index_topk=4, hc_mult=4, hc_sinkhorn_iters=20,
          hc_eps=1e-6, rope_theta=10000.0, compress_rope_theta=160000.0, max_position_embeddings=4096,
          rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 256, "beta_fast": 32,
                        "beta_slow": 1}, bos_token_id=0, eos_token_id=1, initializer_range=0.05)
CONFIGS["v4"] = ("deepseek_v4", V4)


def build_hf_model_v4(kwargs: dict, seed: int = 0):
    """The tiny HF V4 model. HF initialises sinks, position biases, the router bias, the hc base/scale and
    tid2eid to constants; they get random values here so that every one of them matters."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**kwargs)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if name.endswith(("sinks", "position_bias", "e_score_correction_bias", ".base", "hc_base")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif name.endswith((".scale", "hc_scale")):
                t.copy_(1 + torch.rand(t.shape, generator=g))
            elif name.endswith("tid2eid"):                 # distinct experts per token, as the release's table
                t.copy_(torch.rand(t.shape[0], kwargs["n_routed_experts"], generator=g).argsort(-1)[:, :t.shape[1]])
    return model


# HF module names -> the names DeepSeek publishes (spec sections 3.4 and 3.5), for the published-format writer.
_V4_RENAMES = [("model.embed_tokens.", "embed."), ("lm_head.", "head."), ("model.norm.", "norm."),
               ("model.hc_head.hc_", "hc_head_"), ("model.layers.", "layers."), (".self_attn.", ".attn."),
               (".mlp.", ".ffn."), (".input_layernorm.", ".attn_norm."),
               (".post_attention_layernorm.", ".ffn_norm."), (".attn_hc.", ".hc_attn_"), (".ffn_hc.", ".hc_ffn_"),
               (".attn.sinks", ".attn.attn_sink"),
               (".compressor.indexer.scorer.weights_proj.", ".indexer.weights_proj."),
               (".compressor.indexer.q_b_proj.", ".indexer.wq_b."), (".compressor.indexer.", ".indexer.compressor."),
               (".compressor.kv_proj.", ".compressor.wkv."), (".compressor.gate_proj.", ".compressor.wgate."),
               (".compressor.position_bias", ".compressor.ape"), (".compressor.kv_norm.", ".compressor.norm."),
               (".q_a_proj.", ".wq_a."), (".q_a_norm.", ".q_norm."), (".q_b_proj.", ".wq_b."),
               (".attn.kv_proj.", ".attn.wkv."), (".o_a_proj.", ".wo_a."), (".o_b_proj.", ".wo_b."),
               (".gate.e_score_correction_bias", ".gate.bias"), (".shared_experts.gate_proj.", ".shared_experts.w1."),
               (".shared_experts.down_proj.", ".shared_experts.w2."),
               (".shared_experts.up_proj.", ".shared_experts.w3.")]
# Linear weights DeepSeek ships in FP8 (spec 3.4); routed experts go to FP4.
_V4_FP8 = (".attn.wq_a.weight", ".attn.wq_b.weight", ".attn.wkv.weight", ".attn.wo_a.weight", ".attn.wo_b.weight",
           ".indexer.wq_b.weight", ".shared_experts.w1.weight", ".shared_experts.w2.weight",
           ".shared_experts.w3.weight")
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def quantize_fp8_e8m0(w: torch.Tensor, block: int = 128):
    """Test-side FP8 quantizer: per block x block tile, scale 2^ceil(log2(amax / 448)) stored as one E8M0 byte."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    exps = torch.empty(-(-n // block), -(-k // block), dtype=torch.int32)
    for i in range(exps.shape[0]):
        for j in range(exps.shape[1]):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            e = math.ceil(math.log2(max(tile.abs().max().item(), 1e-30) / 448))
            exps[i, j] = e
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / 2.0 ** e).to(torch.float8_e4m3fn)
    return q, (exps + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def quantize_fp4_e8m0(w: torch.Tensor, block: int = 32):
    """Test-side FP4 quantizer: per row and 32 inputs, scale 2^ceil(log2(amax / 6)); the nearest e2m1 value;
    codes packed two per byte (element 2k in the low nibble) as int8; scales as E8M0 bytes."""
    n, k = w.shape
    groups = w.float().view(n, k // block, block)
    amax = groups.abs().amax(-1).clamp(min=1e-30)
    exps = torch.ceil(torch.log2(amax / 6)).to(torch.int32)
    x = groups / torch.exp2(exps.float())[..., None]
    codes = (x.abs()[..., None] - E2M1).abs().argmin(-1) | ((x < 0).to(torch.int64) << 3)     # (n, G, block)
    codes = codes.view(n, k)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return packed, (exps + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def dequantize_fp8_e8m0(q, s, block: int = 128):
    scale = torch.exp2(s.view(torch.uint8).float() - 127)
    scale = scale.repeat_interleave(block, 0)[:q.shape[0]].repeat_interleave(block, 1)[:, :q.shape[1]]
    return q.float() * scale


def dequantize_fp4_e8m0(packed, s, block: int = 32):
    b = packed.view(torch.uint8).long()
    codes = torch.stack([b & 15, b >> 4], -1).flatten(-2)
    vals = E2M1[codes & 7] * (1 - 2 * (codes >> 3)).float()
    return vals * torch.exp2(s.view(torch.uint8).float() - 127).repeat_interleave(block, -1)


def write_published_v4(model, path: Path, mtp: bool = True) -> None:
    """Write `model` (an HF DeepseekV4ForCausalLM) as DeepSeek publishes V4: reference names without `model.`,
    FP8 e4m3 weights with E8M0 128x128 block scales, routed experts as packed FP4 with an E8M0 scale per 32
    inputs, tid2eid as int32, plus an mtp.0 block (which loaders must skip). The model's weights are replaced
    in place by their dequantized values, so that the model is the oracle of the written checkpoint."""
    from safetensors.torch import save_file
    cfg = model.config
    out = {}
    with torch.no_grad():
        for hf_name, t in model.state_dict().items():
            name = hf_name
            for a, b in _V4_RENAMES:
                name = name.replace(a, b)
            if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                stack = name.rsplit(".", 1)[0]
                parts = ({"w1": t[:, :t.shape[1] // 2], "w3": t[:, t.shape[1] // 2:]}
                         if name.endswith("gate_up_proj") else {"w2": t})
                deq = []
                for w, ws in parts.items():
                    rows = []
                    for e in range(ws.shape[0]):
                        q, s = quantize_fp4_e8m0(ws[e])
                        out[f"{stack}.{e}.{w}.weight"], out[f"{stack}.{e}.{w}.scale"] = q, s
                        rows.append(dequantize_fp4_e8m0(q, s))
                    deq.append(torch.stack(rows))
                t.copy_(torch.cat(deq, dim=1))
            elif name.endswith(_V4_FP8):
                q, s = quantize_fp8_e8m0(t)
                out[name], out[name.removesuffix(".weight") + ".scale"] = q, s
                t.copy_(dequantize_fp8_e8m0(q, s))
            elif name.endswith("tid2eid"):
                out[name] = t.to(torch.int32)
            else:
                out[name] = t.clone()
        if mtp:
            d = cfg.hidden_size
            out.update({"mtp.0.e_proj.weight": torch.randn(d, d), "mtp.0.h_proj.weight": torch.randn(d, d),
                        "mtp.0.enorm.weight": torch.ones(d), "mtp.0.hc_head_fn": torch.randn(4, 4 * d),
                        "mtp.0.attn.wq_a.weight": out["layers.0.attn.wq_a.weight"].clone(),
                        "mtp.0.attn.wq_a.scale": out["layers.0.attn.wq_a.scale"].clone()})
    path.mkdir(parents=True, exist_ok=True)
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    ratios = [{"sliding_attention": 0}.get(t, cfg.compress_rates.get(t)) for t in cfg.layer_types] + [0]
    config = dict(model_type="deepseek_v4", vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                  moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                  num_attention_heads=cfg.num_attention_heads, num_key_value_heads=1, head_dim=cfg.head_dim,
                  qk_rope_head_dim=cfg.qk_rope_head_dim, q_lora_rank=cfg.q_lora_rank, o_groups=cfg.o_groups,
                  o_lora_rank=cfg.o_lora_rank, n_routed_experts=cfg.n_routed_experts, n_shared_experts=1,
                  num_experts_per_tok=cfg.num_experts_per_tok, scoring_func="sqrtsoftplus", topk_method="noaux_tc",
                  norm_topk_prob=True, routed_scaling_factor=cfg.routed_scaling_factor,
                  swiglu_limit=cfg.swiglu_limit, num_hash_layers=cfg.mlp_layer_types.count("hash_moe"),
                  compress_ratios=ratios, compress_rope_theta=cfg.compress_rope_theta, rope_theta=cfg.rope_theta,
                  rope_scaling={k: v for k, v in cfg.rope_parameters["compress"].items()
                                if k in ("type", "factor", "original_max_position_embeddings", "beta_fast",
                                         "beta_slow")},
                  sliding_window=cfg.sliding_window, index_n_heads=cfg.index_n_heads,
                  index_head_dim=cfg.index_head_dim, index_topk=cfg.index_topk, hc_mult=cfg.hc_mult,
                  hc_sinkhorn_iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps,
                  max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                  num_nextn_predict_layers=1, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
                  expert_dtype="fp4",
                  quantization_config=dict(activation_scheme="dynamic", fmt="e4m3", quant_method="fp8",
                                           scale_fmt="ue8m0", weight_block_size=[128, 128]))
    (path / "config.json").write_text(json.dumps(config, indent=1))


def stable_topk(self, k, dim=-1, largest=True, sorted=True):
    """torch.topk that breaks ties by the lower index, whatever the row's length (torch.topk's choice among ties
    can depend on it): for tests that compare paths whose score rows differ in length (monkeypatch it in)."""
    idx = torch.argsort(-self if largest else self, dim=dim, stable=True).narrow(dim, 0, k)
    return torch.return_types.topk((self.gather(dim, idx), idx))
