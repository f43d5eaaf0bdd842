"""DeepSeek-V4 model arguments from a `config.json`: the one DeepSeek publishes (compress_ratios, num_hash_layers,
rope_scaling) and the one HF transformers writes (layer_types, mlp_layer_types, nested rope_parameters).

The attention schedule always comes from the checkpoint's own fields, never from a default (spec section 1.2).
"""

from __future__ import annotations

from dataclasses import dataclass

from .args import QuantArgs, RopeArgs, _parse_quant

SLIDING, CSA, HCA = "sliding", "csa", "hca"
# HF layer_types names -> ours
_HF_LAYER_TYPES = {"sliding_attention": SLIDING, "compressed_sparse_attention": CSA,
                   "heavily_compressed_attention": HCA}
_HF_DEFAULT_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
_HF_MLP_TYPES = ("hash_moe", "moe")
_DEFAULT_HASH_LAYERS = 3           # HF's default when a config gives neither num_hash_layers nor mlp_layer_types
SCORE_FUNCS = ("sqrtsoftplus",)    # what V4 releases route with (HF and the reference both renormalise top-k)


@dataclass(frozen=True)
class ModelArgsV4:
    model_type: str
    vocab_size: int
    dim: int                            # hidden_size
    n_layers: int                       # main layers; the MTP block (mtp.*) comes after them
    n_heads: int
    head_dim: int                       # one shared K=V head of head_dim, the last rope_head_dim of it rotated
    rope_head_dim: int                  # qk_rope_head_dim
    q_lora_rank: int
    o_groups: int                       # grouped output projection: heads split into o_groups groups
    o_lora_rank: int                    # ... each projected to o_lora_rank before wo_b
    window_size: int                    # sliding_window: a query sees itself and the window_size - 1 tokens before
    attn_types: tuple[str, ...]         # per layer: "sliding", "csa" (overlapping windows + indexer) or "hca"
    compress_ratios: tuple[int, ...]    # per layer: tokens per compressed entry (0 for sliding layers)
    hash_layers: tuple[bool, ...]       # per layer: routed by tid2eid[token id] instead of the learned top-k
    index_n_heads: int
    index_head_dim: int                 # a power of two (Hadamard rotation)
    index_topk: int                     # compressed entries a CSA query attends to
    n_routed_experts: int
    n_activated_experts: int            # num_experts_per_tok
    moe_inter_dim: int                  # routed and shared expert width
    score_func: str                     # "sqrtsoftplus"
    route_scale: float                  # routed_scaling_factor
    swiglu_limit: float                 # gate clamped above, up clamped to [-limit, limit]; 0 = no clamp
    hc_mult: int                        # hyper-connection streams
    hc_sinkhorn_iters: int
    hc_eps: float
    rope: RopeArgs                      # sliding layers: plain RoPE (rope_theta)
    compress_rope: RopeArgs             # compressed layers, their compressors and indexer: YaRN (compress_rope_theta)
    max_position_embeddings: int
    norm_eps: float = 1e-6
    n_mtp_layers: int = 0               # num_nextn_predict_layers (mtp.* tensors are recognised and skipped)
    quant: QuantArgs | None = None      # FP8 block format of the non-expert linears, if quantized
    expert_dtype: str | None = None     # as the config states it ("fp4", "fp8"); the loader trusts the headers
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    @property
    def softmax_scale(self) -> float:
        return self.head_dim ** -0.5

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelArgsV4:
        """Build from a parsed `config.json`; raises ValueError naming what is wrong and what is allowed."""
        if cfg.get("model_type") != "deepseek_v4":
            raise ValueError(f"ModelArgsV4 reads model_type 'deepseek_v4', got {cfg.get('model_type')!r}")
        d = {k: v for k, v in cfg.items() if v is not None}

        def need(key: str):
            if key not in d:
                raise ValueError(f"config.json is missing required field {key!r} for model_type deepseek_v4")
            return d[key]

        for key, bad, why in (("hidden_act", lambda v: v != "silu", "DeepSeek-V4 uses 'silu'"),
                              ("attention_bias", bool, "V4 has no attention biases"),
                              ("mlp_bias", bool, "V4 has no MLP biases"),
                              ("tie_word_embeddings", bool, "V4 has a separate head"),
                              ("num_key_value_heads", lambda v: v != 1, "V4 attention shares one K=V head")):
            if key in d and bad(d[key]):
                raise ValueError(f"unsupported {key}={d[key]!r}; {why}")
        score_func = d.get("scoring_func", "sqrtsoftplus")
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"unsupported scoring_func {score_func!r} for deepseek_v4; supported: "
                             f"{', '.join(SCORE_FUNCS)}")
        if d.get("topk_method", "noaux_tc") != "noaux_tc":
            raise ValueError(f"unsupported topk_method {d['topk_method']!r} for deepseek_v4; supported: noaux_tc")
        if not d.get("norm_topk_prob", True):
            raise ValueError("norm_topk_prob=false is not supported for deepseek_v4: its routers renormalise top-k")
        if int(d.get("n_shared_experts", 1)) != 1:
            raise ValueError(f"n_shared_experts={d['n_shared_experts']} is not supported; V4 has exactly one")

        n_layers = int(need("num_hidden_layers"))
        head_dim = int(need("head_dim"))
        attn_types, ratios = _parse_schedule(d, n_layers)
        rope_head_dim = int(d["qk_rope_head_dim"]) if "qk_rope_head_dim" in d else \
            int(head_dim * float(d.get("partial_rotary_factor", 64 / 512)))
        main_rope, compress_rope = _parse_ropes(d)
        quant_cfg = d.get("quantization_config") or None
        expert_dtype = d.get("expert_dtype") or (quant_cfg or {}).get("expert_dtype")
        args = cls(
            model_type="deepseek_v4",
            vocab_size=int(need("vocab_size")),
            dim=int(need("hidden_size")),
            n_layers=n_layers,
            n_heads=int(need("num_attention_heads")),
            head_dim=head_dim,
            rope_head_dim=rope_head_dim,
            q_lora_rank=int(need("q_lora_rank")),
            o_groups=int(need("o_groups")),
            o_lora_rank=int(need("o_lora_rank")),
            window_size=int(need("sliding_window")),
            attn_types=attn_types,
            compress_ratios=ratios,
            hash_layers=_parse_hash_layers(d, n_layers),
            index_n_heads=int(need("index_n_heads")),
            index_head_dim=int(need("index_head_dim")),
            index_topk=int(need("index_topk")),
            n_routed_experts=int(need("n_routed_experts")),
            n_activated_experts=int(need("num_experts_per_tok")),
            moe_inter_dim=int(need("moe_intermediate_size")),
            score_func=score_func,
            route_scale=float(d.get("routed_scaling_factor", 1.5)),
            swiglu_limit=float(d.get("swiglu_limit", 10.0)),
            hc_mult=int(d.get("hc_mult", 4)),
            hc_sinkhorn_iters=int(d.get("hc_sinkhorn_iters", 20)),
            hc_eps=float(d.get("hc_eps", 1e-6)),
            rope=main_rope,
            compress_rope=compress_rope,
            max_position_embeddings=int(need("max_position_embeddings")),
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            n_mtp_layers=int(d.get("num_nextn_predict_layers", 0)),
            quant=_parse_quant(quant_cfg),
            expert_dtype=expert_dtype,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(d["eos_token_id"]) if isinstance(d.get("eos_token_id"), list) else d.get("eos_token_id"),
        )
        args.validate()
        return args

    def validate(self) -> None:
        """Check that the fields are consistent with each other."""
        positive = {"vocab_size": self.vocab_size, "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
                    "num_attention_heads": self.n_heads, "head_dim": self.head_dim, "q_lora_rank": self.q_lora_rank,
                    "o_groups": self.o_groups, "o_lora_rank": self.o_lora_rank, "sliding_window": self.window_size,
                    "index_n_heads": self.index_n_heads, "index_topk": self.index_topk,
                    "n_routed_experts": self.n_routed_experts, "moe_intermediate_size": self.moe_inter_dim,
                    "hc_mult": self.hc_mult, "hc_sinkhorn_iters": self.hc_sinkhorn_iters,
                    "max_position_embeddings": self.max_position_embeddings}
        for k, v in positive.items():
            if v <= 0:
                raise ValueError(f"config field {k} must be positive, got {v}")
        if self.rope_head_dim <= 0 or self.rope_head_dim % 2 or self.rope_head_dim >= self.head_dim:
            raise ValueError(f"qk_rope_head_dim={self.rope_head_dim} must be even, positive and below "
                             f"head_dim={self.head_dim}")
        if self.n_heads % self.o_groups:
            raise ValueError(f"o_groups={self.o_groups} must divide num_attention_heads={self.n_heads}")
        ih = self.index_head_dim
        if CSA in self.attn_types and (ih < self.rope_head_dim or ih & (ih - 1)):
            raise ValueError(f"index_head_dim={ih} must be a power of two (Hadamard rotation) and at least "
                             f"qk_rope_head_dim={self.rope_head_dim}")
        if not 1 <= self.n_activated_experts <= self.n_routed_experts:
            raise ValueError(f"num_experts_per_tok={self.n_activated_experts} must be in [1, n_routed_experts="
                             f"{self.n_routed_experts}]")
        if self.swiglu_limit < 0:
            raise ValueError(f"swiglu_limit must be >= 0 (0 = no clamp), got {self.swiglu_limit}")
        r = self.compress_rope
        if r.rope_type == "yarn" and (r.factor <= 0 or r.original_seq_len <= 0):
            raise ValueError("yarn rope scaling needs factor > 0 and original_max_position_embeddings > 0")


def _parse_schedule(d: dict, n_layers: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Per-layer attention type and compression ratio, from layer_types (HF) or compress_ratios (published)."""
    if "layer_types" in d:
        types = list(d["layer_types"])
        if len(types) < n_layers:
            raise ValueError(f"layer_types has {len(types)} entries for num_hidden_layers={n_layers}")
        bad = sorted({t for t in types if t not in _HF_LAYER_TYPES})
        if bad:
            raise ValueError(f"unknown layer_types {bad}; supported: {', '.join(_HF_LAYER_TYPES)}")
        rates = dict(_HF_DEFAULT_RATES)
        rates.update(d.get("compress_rates") or {})
        for key, legacy in (("compressed_sparse_attention", "compress_rate_csa"),
                            ("heavily_compressed_attention", "compress_rate_hca")):
            if legacy in d:
                rates[key] = d[legacy]
        kinds = tuple(_HF_LAYER_TYPES[t] for t in types[:n_layers])
        ratios = tuple(0 if t == "sliding_attention" else int(rates[t]) for t in types[:n_layers])
    elif "compress_ratios" in d:
        ratios_all = [int(r) for r in d["compress_ratios"]]
        if len(ratios_all) < n_layers:
            raise ValueError(f"compress_ratios has {len(ratios_all)} entries for num_hidden_layers={n_layers} "
                             "(it lists every layer, then the MTP block)")
        ratios = tuple(ratios_all[:n_layers])
        # The reference: ratio 4 pools overlapping windows and has an indexer; any other positive ratio pools
        # disjoint windows and attends to every entry.
        kinds = tuple(SLIDING if r == 0 else CSA if r == 4 else HCA for r in ratios)
    else:
        raise ValueError("config.json gives neither compress_ratios nor layer_types; the V4 attention schedule "
                         "must come from the checkpoint")
    bad_ratio = [r for k, r in zip(kinds, ratios) if (k == SLIDING) != (r == 0) or r < 0]
    if bad_ratio:
        raise ValueError(f"compression ratios must be positive for compressed layers and 0 for sliding ones, "
                         f"got {list(ratios)}")
    return kinds, ratios


def _parse_hash_layers(d: dict, n_layers: int) -> tuple[bool, ...]:
    if "mlp_layer_types" in d:
        types = list(d["mlp_layer_types"])
        if len(types) < n_layers or any(t not in _HF_MLP_TYPES for t in types):
            raise ValueError(f"mlp_layer_types must list one of {_HF_MLP_TYPES} per layer, got {types}")
        return tuple(t == "hash_moe" for t in types[:n_layers])
    n_hash = int(d.get("num_hash_layers", _DEFAULT_HASH_LAYERS))
    if n_hash < 0:
        raise ValueError(f"num_hash_layers must be >= 0, got {n_hash}")
    return tuple(i < n_hash for i in range(n_layers))


def _parse_ropes(d: dict) -> tuple[RopeArgs, RopeArgs]:
    """(plain RoPE of sliding layers, RoPE of compressed layers). HF nests them as rope_parameters.{main,
    compress}; the published config gives rope_theta, compress_rope_theta and one rope_scaling for the latter."""
    params = d.get("rope_parameters") or {}
    if isinstance(params.get("main"), dict) and isinstance(params.get("compress"), dict):
        main, comp = params["main"], params["compress"]
        main_theta = float(main.get("rope_theta", d.get("rope_theta", 10000.0)))
        comp_theta = float(comp.get("rope_theta", d.get("compress_rope_theta", 160000.0)))
    else:
        main, comp = {}, params or d.get("rope_scaling") or {}
        main_theta = float(d.get("rope_theta", 10000.0))
        comp_theta = float(d.get("compress_rope_theta", 160000.0))
    main_type = main.get("rope_type", main.get("type", "default"))
    if main_type != "default":
        raise ValueError(f"unsupported rope type {main_type!r} for V4 sliding layers; supported: default")
    comp_type = comp.get("rope_type", comp.get("type", "default"))
    if comp_type == "default":
        return RopeArgs(theta=main_theta), RopeArgs(theta=comp_theta)
    if comp_type != "yarn":
        raise ValueError(f"unsupported rope scaling type {comp_type!r}; supported: default, yarn")
    if "original_max_position_embeddings" not in comp or "factor" not in comp:
        raise ValueError("yarn rope scaling needs 'factor' and 'original_max_position_embeddings'")
    # V4 never scales cos/sin (HF forces attention_factor = 1.0 unless the config sets one).
    compress = RopeArgs(rope_type="yarn", theta=comp_theta, factor=float(comp["factor"]),
                        original_seq_len=int(comp["original_max_position_embeddings"]),
                        beta_fast=float(comp.get("beta_fast") or 32), beta_slow=float(comp.get("beta_slow") or 1),
                        attention_factor=float(comp.get("attention_factor", 1.0)))
    return RopeArgs(theta=main_theta), compress
