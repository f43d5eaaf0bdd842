"""`dsinfer inspect`: what a checkpoint is, how big it is, and whether it fits on given GPUs.

Reads only config.json and the safetensors headers (seconds, even for a 671B checkpoint). Without weights the
tensor list is the one the config implies (`expected_tensors`): every HF tensor name with its shape, in the
config's dtype, FP8 + float32 block scales for the published FP8 set when there is a quantization_config.

Counting conventions (they reproduce DeepSeek's published figures):
- parameters exclude FP8 scales; the MTP layer(s) are counted apart, not in the total;
- active per token = attention + norms + dense MLPs + shared experts + the router + top-k of the routed
  experts + the LM head. The embedding table is left out: a token reads one row of it.
- KV cache per token = (kv_lora_rank + qk_rope_head_dim) x layers x bytes of the cache dtype (bf16: 2). With
  tensor parallelism every rank caches the whole latent (it is shared by all heads).
- GPU fit: weights per rank as `dsinfer convert` would split them (routed experts divided, replicated tensors
  whole, the MTP layer not loaded); `RESERVE_FRACTION` of each GPU is kept for activations, CUDA graphs and the
  CUDA context; the rest holds KV cache.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..models.args import ModelArgs
from .cast import is_fp8_weight
from .convert import check_tp, shard_rule
from .loader import TP_MANIFEST, checkpoint_tensors
from .writer import TensorSpec

RESERVE_FRACTION = 0.10
GiB = 2**30
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
CATEGORIES = ("attention", "norms", "dense MLP", "shared experts", "router", "routed experts", "LM head",
              "embedding", "other")


def expected_tensors(args: ModelArgs, cfg: dict) -> list[TensorSpec]:
    """Every tensor a published-style checkpoint with this config holds (HF names), MTP layers included."""
    wdt = _DTYPES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"), "BF16")
    D, H, V = args.dim, args.n_heads, args.vocab_size
    out: list[TensorSpec] = []

    def add(name: str, *shape: int, dtype: str = wdt):
        if args.quant and is_fp8_weight(name):
            block = args.quant.block_size
            out.append(TensorSpec(name, "F8_E4M3", shape))
            out.append(TensorSpec(name + "_scale_inv", "F32", (-(-shape[0] // block[0]), -(-shape[1] // block[1]))))
        else:
            out.append(TensorSpec(name, dtype, shape))

    def mlp(prefix: str, inter: int):
        add(f"{prefix}.gate_proj.weight", inter, D)
        add(f"{prefix}.up_proj.weight", inter, D)
        add(f"{prefix}.down_proj.weight", D, inter)

    def layer(i: int):
        p = f"model.layers.{i}"
        add(f"{p}.input_layernorm.weight", D)
        add(f"{p}.post_attention_layernorm.weight", D)
        a = f"{p}.self_attn"
        if args.q_lora_rank:
            add(f"{a}.q_a_proj.weight", args.q_lora_rank, D)
            add(f"{a}.q_a_layernorm.weight", args.q_lora_rank)
            add(f"{a}.q_b_proj.weight", H * args.qk_head_dim, args.q_lora_rank)
        else:
            add(f"{a}.q_proj.weight", H * args.qk_head_dim, D)
        add(f"{a}.kv_a_proj_with_mqa.weight", args.kv_lora_rank + args.qk_rope_head_dim, D)
        add(f"{a}.kv_a_layernorm.weight", args.kv_lora_rank)
        add(f"{a}.kv_b_proj.weight", H * (args.qk_nope_head_dim + args.v_head_dim), args.kv_lora_rank)
        add(f"{a}.o_proj.weight", D, H * args.v_head_dim)
        if not args.is_moe_layer(i):
            mlp(f"{p}.mlp", args.inter_dim)
            return
        add(f"{p}.mlp.gate.weight", args.n_routed_experts, D)
        if args.has_gate_bias:
            add(f"{p}.mlp.gate.e_score_correction_bias", args.n_routed_experts, dtype="F32")
        for e in range(args.n_routed_experts):
            mlp(f"{p}.mlp.experts.{e}", args.moe_inter_dim)
        if args.n_shared_experts:
            mlp(f"{p}.mlp.shared_experts", args.n_shared_experts * args.moe_inter_dim)

    add("model.embed_tokens.weight", V, D)
    for i in range(args.n_layers):
        layer(i)
    add("model.norm.weight", D)
    add("lm_head.weight", V, D)
    for i in range(args.n_layers, args.n_layers + args.n_mtp_layers):
        layer(i)
        p = f"model.layers.{i}"
        for n in ("enorm", "hnorm", "shared_head.norm"):
            add(f"{p}.{n}.weight", D)
        add(f"{p}.eh_proj.weight", D, 2 * D)
        add(f"{p}.shared_head.head.weight", V, D)
        add(f"{p}.embed_tokens.weight", V, D)
    return out


def category(name: str) -> str:
    """Which part of the model an HF tensor belongs to (for the parameter breakdown)."""
    if name == "model.embed_tokens.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "LM head"
    if ".self_attn." in name:
        return "attention"
    if name == "model.norm.weight" or name.endswith("layernorm.weight"):
        return "norms"
    for key, cat in ((".mlp.experts.", "routed experts"),
                     (".mlp.shared_experts.", "shared experts"), (".mlp.gate.", "router"), (".mlp.", "dense MLP")):
        if key in name:
            return cat
    return "other"


@dataclass
class Fit:
    gpus: int
    gpu_mem: int                     # bytes per GPU
    reserve: int                     # bytes per GPU kept for activations, CUDA graphs, the CUDA context
    weights_per_rank: int
    kv_room: int                     # bytes per GPU left for KV cache (negative: does not fit)
    max_tokens: int                  # tokens of KV cache that fit (all sequences together)
    max_context: int                 # longest single sequence: max_tokens capped by max_position_embeddings
    context: int | None
    max_batch: int | None            # sequences of `context` tokens that fit at once
    min_gpus: int | None             # when it does not fit: the smallest tp (power of two) that does


@dataclass
class Sizing:
    path: Path
    model_type: str
    version: str
    source: str                                  # "safetensors headers (...)" or "config.json only ..."
    n_layers: int
    params: dict[str, int] = field(default_factory=dict)          # main layers, by category
    mtp_params: int = 0
    active: dict[str, int] = field(default_factory=dict)          # per token, by category
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)  # main layers (FP8 scales included)
    mtp_bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    kv_values: int = 0                           # cached values per token per layer (latent + rope key)
    kv_bytes_per_token: int = 0
    fit: Fit | None = None

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def active_params(self) -> int:
        return sum(self.active.values())


def guess_version(args: ModelArgs) -> str:
    """The release a config most likely belongs to; says so when releases share one config."""
    size = (args.dim, args.n_layers, args.n_routed_experts)
    if args.model_type == "deepseek_v2":
        if size == (2048, 27, 64) and not args.q_lora_rank:
            return "DeepSeek-V2-Lite (16B; Base and Chat share this config)"
        if size == (5120, 60, 160):
            return "DeepSeek-V2 / V2.5 (236B; they share this config)"
        return "deepseek_v2 family (sizes match no release)"
    if size == (7168, 61, 256):
        if args.quant and args.quant.scale_fmt == "ue8m0":
            return "DeepSeek-V3.1 (deepseek_v3 family; FP8 with ue8m0 scales)"
        if args.quant:
            return "deepseek_v3 family: DeepSeek-V3 / V3-0324 / R1 / R1-0528 (671B; they share this config)"
        return "deepseek_v3 family, 671B, not FP8 (V3 / R1 / V3.1 cannot be told apart)"
    return "deepseek_v3 family (sizes match no release)"


def inspect_checkpoint(path: str | Path, gpus: int | None = None, gpu_mem_gib: float | None = None,
                       context: int | None = None, kv_bytes: int = 2) -> Sizing:
    """Size up the checkpoint folder (or bare config.json) at `path`; with `gpus` and `gpu_mem_gib`, the fit."""
    path = Path(path).expanduser()
    config = path if path.is_file() else path / "config.json"
    if not config.is_file():
        raise ValueError(f"{path} is neither a config.json nor a folder holding one")
    try:
        cfg = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config} is not valid JSON ({e})") from None
    args = ModelArgs.from_hf_config(cfg)
    folder = config.parent
    has_weights = (folder / TP_MANIFEST).is_file() or any(folder.glob("*.safetensors"))
    if has_weights:
        infos = checkpoint_tensors(folder)
        specs = [TensorSpec(n, i.dtype, i.shape) for n, i in infos.items()]
        files = len({p for i in infos.values() for p in (i.parts or (i.file,))})
        source = f"safetensors headers ({files} file{'s' if files > 1 else ''})"
    else:
        specs = expected_tensors(args, cfg)
        source = "config.json only (no weights here: shapes and dtypes implied by the config)"

    s = Sizing(folder, args.model_type, guess_version(args), source, args.n_layers)
    s.params = dict.fromkeys(CATEGORIES, 0)
    main = []
    for t in specs:
        m = _LAYER.match(t.name)
        mtp = m is not None and int(m.group(1)) >= args.n_layers
        by_dtype = s.mtp_bytes_by_dtype if mtp else s.bytes_by_dtype
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
        if mtp:
            s.mtp_params += 0 if t.name.endswith("_scale_inv") else _numel(t.shape)
            continue
        main.append(t)
        if not t.name.endswith("_scale_inv"):
            s.params[category(t.name)] += _numel(t.shape)
    s.active = {c: n for c, n in s.params.items() if c not in ("embedding", "routed experts")}
    if args.n_routed_experts:
        s.active[f"routed experts (top-{args.n_activated_experts} of {args.n_routed_experts})"] = \
            s.params["routed experts"] * args.n_activated_experts // args.n_routed_experts
    s.kv_values = args.kv_cache_dim
    s.kv_bytes_per_token = args.kv_cache_dim * args.n_layers * kv_bytes
    if gpus is not None or gpu_mem_gib is not None:
        if gpus is None or gpu_mem_gib is None:
            raise ValueError("--gpus and --gpu-mem go together")
        if gpu_mem_gib <= 0:
            raise ValueError(f"--gpu-mem must be positive, got {gpu_mem_gib}")
        s.fit = _fit(main, args, gpus, int(gpu_mem_gib * GiB), context, s.kv_bytes_per_token)
    elif context is not None:
        raise ValueError("--context needs --gpus and --gpu-mem")
    return s


def weights_per_rank(tensors: list[TensorSpec], tp: int) -> int:
    """Bytes one of `tp` ranks holds when the tensors are split as `dsinfer convert` splits them."""
    total = 0
    for t in tensors:
        kind, dim = shard_rule(t.name)
        total += t.nbytes if (kind, dim) == ("split", None) else t.nbytes // tp
    return total


def _fit(tensors: list[TensorSpec], args: ModelArgs, gpus: int, mem: int, context: int | None,
         kv_per_token: int) -> Fit:
    check_tp(args, gpus, "--gpus")
    if context is not None and not 1 <= context <= args.max_position_embeddings:
        raise ValueError(f"--context must be in [1, {args.max_position_embeddings}], got {context}")
    reserve = int(mem * RESERVE_FRACTION)
    weights = weights_per_rank(tensors, gpus)
    room = mem - reserve - weights
    tokens = max(room, 0) // kv_per_token
    min_gpus = None
    if tokens == 0:
        for n in (2**i for i in range(11)):
            try:
                check_tp(args, n)
            except ValueError:
                break
            if weights_per_rank(tensors, n) + reserve < mem:
                min_gpus = n
                break
    return Fit(gpus, mem, reserve, weights, room, tokens, min(tokens, args.max_position_embeddings), context,
               tokens // context if context else None, min_gpus)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _b(n: float) -> str:
    """Parameters as 671.0B / 15.7B / 2.4M."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def _gib(n: float) -> str:
    for unit, div in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def format_sizing(s: Sizing) -> str:
    """The report `dsinfer inspect` prints."""
    lines = [f"model:        {s.path} ({s.model_type})",
             f"version:      {s.version}",
             f"read from:    {s.source}",
             f"parameters:   {s.total_params:,} ({_b(s.total_params)}) in {s.n_layers} layers; "
             + (f"MTP layer(s) apart: {s.mtp_params:,} ({_b(s.mtp_params)})" if s.mtp_params else "no MTP layer"),
             "              " + ", ".join(f"{c} {_b(n)}" for c, n in s.params.items() if n),
             f"active/token: {s.active_params:,} ({_b(s.active_params)}) = "
             + " + ".join(f"{c} {_b(n)}" for c, n in s.active.items() if n),
             "              (the embedding table is not counted: a token reads one row of it)"]
    for label, by in (("weights:", s.bytes_by_dtype), ("MTP weights:", s.mtp_bytes_by_dtype)):
        if by:
            parts = ", ".join(f"{d} {_gib(n)}" for d, n in sorted(by.items(), key=lambda x: -x[1]))
            lines.append(f"{label:<13} {_gib(sum(by.values()))} ({sum(by.values()):,} bytes: {parts})")
    lines.append(f"KV cache:     {s.kv_bytes_per_token:,} bytes/token (bf16 latent + rope key, "
                 f"{s.kv_values} values x {s.n_layers} layers x {s.kv_bytes_per_token // s.kv_values // s.n_layers} "
                 "bytes)")
    f = s.fit
    if f is not None:
        split = f"tp={f.gpus}, routed experts divided, " if f.gpus > 1 else ""
        lines.append(f"on {f.gpus} GPU{'s' if f.gpus > 1 else ''} of {_gib(f.gpu_mem)} ({split}MTP not loaded; "
                     f"{RESERVE_FRACTION:.0%} = {_gib(f.reserve)} per GPU reserved for activations, CUDA graphs "
                     "and context):")
        lines.append(f"  weights per GPU {_gib(f.weights_per_rank)}; KV cache room per GPU {_gib(f.kv_room)}")
        if f.max_tokens == 0:
            hint = (f"; it needs tp >= {f.min_gpus} GPUs of this size" if f.min_gpus else
                    "; no tensor-parallel size that divides the model makes it fit on GPUs of this size")
            lines.append(f"  does NOT fit{hint}")
        else:
            lines.append(f"  fits: {f.max_tokens:,} tokens of KV cache in all; longest single context "
                         f"{f.max_context:,} tokens")
            if f.context:
                lines.append(f"  at --context {f.context:,}: up to {f.max_batch:,} sequences at once")
    return "\n".join(lines)
