"""DeepSeek-V4 tensor names: the one place the checkpoint formats are told apart and mapped onto ours.

Ours are the reference's (`layers.3.attn.wq_a.weight`, `layers.3.ffn.experts.w1` stacked per layer, `.scale`
beside an FP8 weight). Two formats load:
- "reference": DeepSeek's release. No `model.` prefix; FP8 scales and FP4 expert scales named `.scale`;
  routed experts one tensor per expert (`layers.N.ffn.experts.E.w1.weight`).
- "hf": written by transformers (`model.` prefix). Its saver maps most names back to the reference's but leaves
  some in HF's module names (`model.embed_tokens`, `model.hc_head.hc_fn`, the attention's kv_norm saved as
  `attn.norm`); older savers and hand-made folders may use HF's module names throughout (`self_attn.q_a_proj`,
  stacked `mlp.experts.gate_up_proj` [E, 2I, D] with the gate rows first, `weight_scale_inv`). Every one of
  these spellings maps to ours.
The MTP block (`mtp.*`) is recognised and skipped, as are layers at index >= num_hidden_layers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

FORMATS = ("reference", "hf")

# HF module names -> ours, applied in order after the `model.` prefix is dropped.
_HF_RULES = [(re.compile(p), r) for p, r in (
    (r"^embed_tokens\.", "embed."),
    (r"^lm_head\.", "head."),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"),
    (r"\.ffn_hc\.(fn|base|scale)$", r".hc_ffn_\1"),
    (r"\.attn\.sinks$", ".attn.attn_sink"),
    (r"\.compressor\.indexer\.scorer\.weights_proj\.", ".indexer.weights_proj."),
    (r"\.compressor\.indexer\.q_b_proj\.", ".indexer.wq_b."),
    (r"\.compressor\.indexer\.", ".indexer.compressor."),
    (r"\.compressor\.kv_proj\.", ".compressor.wkv."),
    (r"\.compressor\.gate_proj\.", ".compressor.wgate."),
    (r"\.compressor\.position_bias$", ".compressor.ape"),
    (r"\.compressor\.kv_norm\.", ".compressor.norm."),
    (r"\.attn\.norm\.", ".attn.kv_norm."),            # transformers' saver writes the attention kv_norm so
    (r"\.attn\.kv_proj\.", ".attn.wkv."),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_a_norm\.", ".q_norm."),
    (r"\.q_b_proj\.", ".wq_b."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.weight_scale_inv$", ".scale"),
)]
_LAYER = re.compile(r"^layers\.(\d+)\.")
_EXPERT = re.compile(r"^(layers\.\d+\.ffn\.experts)\.(\d+)\.(w[123])\.(weight|scale)$")
_STACKED = re.compile(r"^(layers\.\d+\.ffn\.experts)\.(gate_up_proj|down_proj)$")
_IGNORED = re.compile(r"(^mtp\.)|((^|\.)rotary_emb\.)")


@dataclass(frozen=True)
class TargetV4:
    """Where a checkpoint tensor goes: a parameter (or scale slot) name; `expert` for one expert of a stack;
    `part` for half of a stacked HF gate_up_proj (0: gate rows -> w1, 1: up rows -> w3)."""

    name: str
    expert: int | None = None
    part: int | None = None


def checkpoint_format(names: Iterable[str]) -> str:
    """"hf" when tensor names carry transformers' `model.` prefix, else "reference"."""
    return "hf" if any(n.startswith("model.") for n in names) else "reference"


def to_native(name: str, fmt: str, n_layers: int) -> list[TargetV4]:
    """The targets of one checkpoint tensor; [] for tensors we skip (MTP, layers past n_layers, rotary buffers)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown V4 checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "hf":
        name = name.removeprefix("model.")
        for pattern, repl in _HF_RULES:
            name = pattern.sub(repl, name)
    if _IGNORED.search(name):
        return []
    m = _LAYER.match(name)
    if m and int(m.group(1)) >= n_layers:
        return []
    e = _EXPERT.match(name)
    if e:
        stack, index, w, kind = e.groups()
        return [TargetV4(f"{stack}.{w}" + ("_scale" if kind == "scale" else ""), int(index))]
    s = _STACKED.match(name)
    if s:
        stack, kind = s.groups()
        if kind == "down_proj":
            return [TargetV4(f"{stack}.w2")]
        return [TargetV4(f"{stack}.w1", part=0), TargetV4(f"{stack}.w3", part=1)]
    return [TargetV4(name)]


def native_to_reference(name: str, expert: int | None = None) -> str:
    """The published (reference) name of one of our tensors, one expert of a stack where `expert` is given."""
    if expert is None:
        return name
    stack, w = name.rsplit(".", 1)
    kind = "scale" if w.endswith("_scale") else "weight"
    return f"{stack}.{expert}.{w.removesuffix('_scale')}.{kind}"
