"""Tiny DeepSeek checkpoints built with HF transformers and saved as real HF checkpoint folders.

Configs follow the spec's section 6: a V2-Lite-like one (plain q_proj, softmax greedy, 2 shared experts), a
V2-like one (q_lora, softmax group-limited, route scale 16) and a V3-like one (sigmoid noaux_tc with groups,
q_lora, norm_topk_prob), YaRN active in each. Each folder also gets a small byte-level BPE tokenizer with
DeepSeek's special tokens and a V3-style chat template, so the whole API and CLI run on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 320
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
SPECIALS = [BOS, EOS, "<｜▁pad▁｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]

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


def build_hf_model(name: str, seed: int = 0):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM
    model_type, kwargs = CONFIGS[name]
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
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["The quick brown fox jumps over the lazy dog. " * 3, "To be, or not to be, that is the question.",
              "Hello world! Tensor parallel latent attention with mixture of experts.", "0123456789 +-*/=()"] * 20
    tok.train_from_iterator(corpus, trainer)
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
