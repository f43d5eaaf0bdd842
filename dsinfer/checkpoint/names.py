"""The one table between Hugging Face tensor names (V2/V3 checkpoints as published) and ours.

Ours follow DeepSeek's reference `model.py`: `layers.3.attn.wq_a.weight`, `layers.3.ffn.experts.w1`, ... .
Routed experts are stacked per layer, so an expert tensor maps to (stacked name, expert index).
FP8 block scales (`*.weight_scale_inv`) map to `*.scale` beside a Linear's weight, or `w1_scale` beside a stack.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# HF module name -> ours (applied to every dotted component)
MODULE_RENAMES = {
    "embed_tokens": "embed",
    "lm_head": "head",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn": "attn",
    "mlp": "ffn",
    "q_proj": "wq",
    "q_a_proj": "wq_a",
    "q_a_layernorm": "q_norm",
    "q_b_proj": "wq_b",
    "kv_a_proj_with_mqa": "wkv_a",
    "kv_a_layernorm": "kv_norm",
    "kv_b_proj": "wkv_b",
    "o_proj": "wo",
    "gate_proj": "w1",
    "down_proj": "w2",
    "up_proj": "w3",
    "e_score_correction_bias": "bias",
}
_REVERSE = {v: k for k, v in MODULE_RENAMES.items()}

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^(layers\.\d+\.ffn\.experts)\.(\d+)\.(w[123])\.(weight|scale)$")
# Tensors some checkpoints carry that hold no weights of ours.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor goes: a parameter name, and the expert index for stacked experts."""

    name: str
    expert: int | None = None


def hf_to_native(hf_name: str, n_layers: int) -> Target | None:
    """Map one HF tensor name; None for tensors we skip (MTP layers at index >= n_layers, rotary buffers)."""
    if _IGNORED.search(hf_name):
        return None
    m = _LAYER.match(hf_name)
    if m and int(m.group(1)) >= n_layers:
        return None                                    # multi-token-prediction layer(s): recognised, not used yet
    name = hf_name.removeprefix("model.")
    if name.endswith(".weight_scale_inv"):
        name = name.removesuffix(".weight_scale_inv") + ".scale"
    name = ".".join(MODULE_RENAMES.get(part, part) for part in name.split("."))
    e = _EXPERT.match(name)
    if e:
        stacked, index, w, kind = e.groups()
        return Target(f"{stacked}.{w}" + ("_scale" if kind == "scale" else ""), int(index))
    return Target(name)


def native_to_hf(name: str, expert: int | None = None) -> str:
    """The HF name of one of our tensors (for messages about missing tensors)."""
    if expert is not None:
        stacked, w = name.rsplit(".", 1)
        kind = "weight_scale_inv" if w.endswith("_scale") else "weight"
        name = f"{stacked}.{expert}.{w.removesuffix('_scale')}.{kind}"
    elif name.endswith(".scale"):
        name = name.removesuffix(".scale") + ".weight_scale_inv"
    hf = ".".join(_REVERSE.get(p, p) for p in name.split("."))
    return hf if hf.startswith("lm_head") else "model." + hf
