"""Model arguments read from a Hugging Face `config.json` (DeepSeek V2 / V2-Lite / V3 / R1 / V3.1).

Every difference between releases is an explicit field here; nothing is guessed from a dimension.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")

# (score_func, topk_method) pairs that exist in DeepSeek releases.
SUPPORTED_ROUTING = {
    ("softmax", "greedy"): "V2-Lite",
    ("softmax", "group_limited_greedy"): "V2",
    ("sigmoid", "noaux_tc"): "V3 / R1 / V3.1",
}

# Defaults of the HF config classes for keys a config.json may leave out.
_DEFAULTS = {
    "deepseek_v2": dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, n_group=1, topk_group=1,
                        routed_scaling_factor=1.0, first_k_dense_replace=0, n_shared_experts=2),
    "deepseek_v3": dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, n_group=8, topk_group=4,
                        routed_scaling_factor=2.5, first_k_dense_replace=3, n_shared_experts=1),
}


@dataclass(frozen=True)
class RopeArgs:
    """Rotary embedding settings; `rope_type` is "default" (plain RoPE) or "yarn"."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0                 # YaRN: context extension factor (> 1 turns the frequency blend on)
    original_seq_len: int = 4096        # YaRN: original_max_position_embeddings
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0                 # YaRN: numerator of the cos/sin attention factor (0 = unset)
    mscale_all_dim: float = 0.0         # YaRN: enters the softmax scale as mscale(factor, mscale_all_dim)^2
    attention_factor: float | None = None  # explicit cos/sin factor, if the config gives one


@dataclass(frozen=True)
class QuantArgs:
    """FP8 checkpoint format: e4m3 weights with one float32 `weight_scale_inv` per block."""

    block_size: tuple[int, int] = (128, 128)
    scale_fmt: str | None = None        # "ue8m0" (V3.1): activation scales rounded up to powers of two


@dataclass(frozen=True)
class ModelArgs:
    model_type: str
    vocab_size: int
    dim: int                            # hidden_size
    inter_dim: int                      # dense MLP width (first n_dense_layers layers)
    moe_inter_dim: int                  # width of one routed expert
    n_layers: int                       # main layers; the MTP layers come after these in the checkpoint
    n_dense_layers: int                 # first_k_dense_replace
    n_heads: int
    # mixture of experts
    n_routed_experts: int
    n_shared_experts: int               # shared experts form one MLP of width n_shared_experts * moe_inter_dim
    n_activated_experts: int            # top-k
    n_expert_groups: int                # n_group (1 = no group routing)
    n_limited_groups: int               # topk_group: groups kept per token
    score_func: str                     # "softmax" | "sigmoid"
    topk_method: str                    # "greedy" | "group_limited_greedy" | "noaux_tc"
    norm_topk_prob: bool                # renormalise the top-k weights to sum to 1
    route_scale: float                  # routed_scaling_factor
    # multi-head latent attention
    q_lora_rank: int                    # 0: a single q_proj (V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope: RopeArgs
    max_position_embeddings: int
    norm_eps: float = 1e-6
    n_mtp_layers: int = 0               # num_nextn_predict_layers (recognised and skipped for now)
    quant: QuantArgs | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    @property
    def has_gate_bias(self) -> bool:
        """noaux_tc routing carries a float32 `e_score_correction_bias` used for expert selection only."""
        return self.topk_method == "noaux_tc"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer: the normalised latent plus the rotated key part."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim ** -0.5
        r = self.rope
        if r.rope_type == "yarn" and r.mscale_all_dim:
            m = yarn_mscale(r.factor, r.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.n_dense_layers

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """Build from a parsed `config.json`; raises ValueError naming what is wrong and what is allowed."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            hint = " (V3.2 is not supported yet; DeepSeek-V4 reads through ModelArgsV4)" if str(model_type).startswith(
                "deepseek") else ""
            raise ValueError(f"unsupported model_type {model_type!r}{hint}; "
                             f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        d = {**_DEFAULTS[model_type], **{k: v for k, v in cfg.items() if v is not None}}

        def need(key: str):
            if key not in d:
                raise ValueError(f"config.json is missing required field {key!r} for model_type {model_type}")
            return d[key]

        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}; DeepSeek models use 'silu'")
        if d.get("attention_bias", False):
            raise ValueError("attention_bias=true is not supported; DeepSeek releases have no attention biases")
        if d.get("moe_layer_freq", 1) != 1:
            raise ValueError(f"moe_layer_freq={d['moe_layer_freq']} is not supported; only 1 (every layer after "
                             "first_k_dense_replace is MoE)")
        if d.get("tie_word_embeddings", False):
            raise ValueError("tie_word_embeddings=true is not supported; DeepSeek releases have a separate lm_head")

        score_func, topk_method = d["scoring_func"], d["topk_method"]
        if (score_func, topk_method) not in SUPPORTED_ROUTING:
            allowed = "; ".join(f"{s}+{t} ({v})" for (s, t), v in SUPPORTED_ROUTING.items())
            raise ValueError(f"unsupported routing scoring_func={score_func!r} with topk_method={topk_method!r}; "
                             f"supported: {allowed}")

        quant = _parse_quant(d.get("quantization_config"))
        args = cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            dim=int(need("hidden_size")),
            inter_dim=int(need("intermediate_size")),
            moe_inter_dim=int(need("moe_intermediate_size")),
            n_layers=int(need("num_hidden_layers")),
            n_dense_layers=int(d["first_k_dense_replace"]),
            n_heads=int(need("num_attention_heads")),
            n_routed_experts=int(need("n_routed_experts")),
            n_shared_experts=int(d["n_shared_experts"]),
            n_activated_experts=int(need("num_experts_per_tok")),
            n_expert_groups=int(d["n_group"]),
            n_limited_groups=int(d["topk_group"]),
            score_func=score_func,
            topk_method=topk_method,
            norm_topk_prob=bool(d["norm_topk_prob"]),
            route_scale=float(d["routed_scaling_factor"]),
            q_lora_rank=int(d.get("q_lora_rank") or 0),
            kv_lora_rank=int(need("kv_lora_rank")),
            qk_nope_head_dim=int(need("qk_nope_head_dim")),
            qk_rope_head_dim=int(need("qk_rope_head_dim")),
            v_head_dim=int(need("v_head_dim")),
            rope=_parse_rope(d),
            max_position_embeddings=int(need("max_position_embeddings")),
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            n_mtp_layers=int(d.get("num_nextn_predict_layers", 0)),
            quant=quant,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(d["eos_token_id"]) if isinstance(d.get("eos_token_id"), list) else d.get("eos_token_id"),
        )
        args.validate()
        return args

    def validate(self) -> None:
        """Check that the fields are consistent with each other."""
        positive = dict(vocab_size=self.vocab_size, hidden_size=self.dim, num_hidden_layers=self.n_layers,
                        num_attention_heads=self.n_heads, kv_lora_rank=self.kv_lora_rank,
                        qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim,
                        max_position_embeddings=self.max_position_embeddings)
        for k, v in positive.items():
            if v <= 0:
                raise ValueError(f"config field {k} must be positive, got {v}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even (rotary pairs), got {self.qk_rope_head_dim}")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise ValueError(f"first_k_dense_replace={self.n_dense_layers} must be in [0, num_hidden_layers="
                             f"{self.n_layers}]")
        if self.n_dense_layers and self.inter_dim <= 0:
            raise ValueError("intermediate_size must be positive when there are dense layers")
        if self.n_dense_layers < self.n_layers:
            if self.n_routed_experts <= 0 or self.moe_inter_dim <= 0:
                raise ValueError("n_routed_experts and moe_intermediate_size must be positive for MoE layers")
            if not 1 <= self.n_activated_experts <= self.n_routed_experts:
                raise ValueError(f"num_experts_per_tok={self.n_activated_experts} must be in [1, n_routed_experts="
                                 f"{self.n_routed_experts}]")
            if self.n_expert_groups < 1 or self.n_routed_experts % self.n_expert_groups:
                raise ValueError(f"n_group={self.n_expert_groups} must divide n_routed_experts={self.n_routed_experts}")
            if not 1 <= self.n_limited_groups <= self.n_expert_groups:
                raise ValueError(f"topk_group={self.n_limited_groups} must be in [1, n_group={self.n_expert_groups}]")
            per_group = self.n_routed_experts // self.n_expert_groups
            if self.topk_method == "noaux_tc" and self.n_expert_groups > 1 and per_group < 2:
                raise ValueError("noaux_tc group routing sums the top-2 scores of each group; it needs at least 2 "
                                 f"experts per group, got {per_group}")
            if self.n_limited_groups * per_group < self.n_activated_experts:
                raise ValueError(f"topk_group={self.n_limited_groups} groups of {per_group} experts cannot supply "
                                 f"num_experts_per_tok={self.n_activated_experts} experts")
        r = self.rope
        if r.rope_type == "yarn" and (r.factor <= 0 or r.original_seq_len <= 0):
            raise ValueError("rope_scaling of type yarn needs factor > 0 and original_max_position_embeddings > 0")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN magnitude correction 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _parse_rope(d: dict) -> RopeArgs:
    # Published checkpoints write `rope_theta` + `rope_scaling`; HF transformers 5 writes `rope_parameters`.
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default" or not params:
        return RopeArgs(rope_type="default", theta=theta)
    if rope_type != "yarn":
        raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: default, yarn")
    if "original_max_position_embeddings" not in params or "factor" not in params:
        raise ValueError("yarn rope scaling needs 'factor' and 'original_max_position_embeddings'")
    return RopeArgs(
        rope_type="yarn", theta=theta, factor=float(params["factor"]),
        original_seq_len=int(params["original_max_position_embeddings"]),
        beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
        mscale=float(params.get("mscale") or 0), mscale_all_dim=float(params.get("mscale_all_dim") or 0),
        attention_factor=params.get("attention_factor"),
    )


def _parse_quant(q: dict | None) -> QuantArgs | None:
    if not q:
        return None
    method = q.get("quant_method", "fp8")
    if method != "fp8":
        raise ValueError(f"unsupported quantization_config.quant_method {method!r}; supported: fp8 (block-scaled e4m3)")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"unsupported quantization_config.fmt {fmt!r}; supported: e4m3")
    block = q.get("weight_block_size", [128, 128])
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(int(b) > 0 for b in block)):
        raise ValueError(f"quantization_config.weight_block_size must be two positive ints, got {block!r}")
    scale_fmt = q.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"unsupported quantization_config.scale_fmt {scale_fmt!r}; supported: ue8m0 or none")
    return QuantArgs(block_size=(int(block[0]), int(block[1])), scale_fmt=scale_fmt)
