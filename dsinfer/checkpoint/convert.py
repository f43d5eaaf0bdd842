"""`dsinfer convert`: split a checkpoint into per-rank files for tensor parallelism, as DeepSeek's reference
`convert.py` does (`model{rank}-mp{N}.safetensors`), but keeping HF tensor names.

Rank r of N gets, for every tensor, one of three things (the table `SPLIT_DIMS`, keyed like the reference by
the module name, i.e. the second-to-last name component):
- a contiguous 1/N slice along the split dim: attention heads (q_proj / q_b_proj / kv_b_proj rows, o_proj
  columns), the vocabulary (embedding and LM head rows) and the widths of dense MLPs and shared experts
  (gate/up rows, down columns). An FP8 `weight_scale_inv` is split along its weight's dim, which needs every
  rank's slice to be a whole number of scale blocks;
- the whole tensor (replicated): norms, q_a_proj, kv_a_proj_with_mqa, the router weight and bias;
- routed experts are never split: rank r owns experts [r·E/N, (r+1)·E/N) whole.

The manifest `dsinfer_tp.json` records the split dim (or owning rank) and full shape of every tensor, so a loader
can reassemble the model in one process (`loader.checkpoint_tensors`) or take one rank's file as it is.
The MTP layer is carried over under the same rules (its `eh_proj` replicated, `shared_head.head` split like
the LM head).
"""

from __future__ import annotations

import re
from pathlib import Path

from safetensors import safe_open
from tqdm import tqdm

from ..models.args import ModelArgs
from .loader import TP_MANIFEST, TensorInfo, checkpoint_files, read_config, read_headers
from .writer import CheckpointWriter, TensorSpec

REPLICATED = None
# HF module name -> the dim its weight (and FP8 scale) is split along; REPLICATED: every rank holds it whole.
SPLIT_DIMS: dict[str, int | None] = {
    "embed_tokens": 0, "lm_head": 0, "head": 0,                     # vocabulary (head: MTP shared_head.head)
    "q_proj": 0, "q_b_proj": 0, "kv_b_proj": 0, "o_proj": 1,         # attention heads
    "gate_proj": 0, "up_proj": 0, "down_proj": 1,                    # dense MLP / shared-expert width
    "q_a_proj": REPLICATED, "kv_a_proj_with_mqa": REPLICATED,
    "q_a_layernorm": REPLICATED, "kv_a_layernorm": REPLICATED, "input_layernorm": REPLICATED,
    "post_attention_layernorm": REPLICATED, "norm": REPLICATED, "gate": REPLICATED,
    "enorm": REPLICATED, "hnorm": REPLICATED, "eh_proj": REPLICATED,  # MTP layer
}
_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def rank_file(rank: int, tp: int) -> str:
    return f"model{rank}-mp{tp}.safetensors"


def shard_rule(name: str) -> tuple[str, int | None]:
    """("expert", expert index) for a routed expert's tensor, else ("split", dim) or ("split", REPLICATED)."""
    e = _EXPERT.search(name)
    if e:
        return "expert", int(e.group(1))
    module = name.split(".")[-2] if "." in name else name
    if module not in SPLIT_DIMS:
        raise ValueError(f"no sharding rule for tensor {name} (module {module!r}); known modules: "
                         f"{', '.join(sorted(SPLIT_DIMS))}")
    return "split", SPLIT_DIMS[module]


def check_tp(args: ModelArgs, tp: int, flag: str = "--tp") -> None:
    """Raise ValueError unless `tp` divides everything that tensor parallelism splits."""
    if tp < 1:
        raise ValueError(f"{flag} must be a positive integer, got {tp}")
    sizes = {"num_attention_heads": args.n_heads, "vocab_size": args.vocab_size}
    if args.n_dense_layers:
        sizes["intermediate_size (dense MLP width)"] = args.inter_dim
    if args.n_dense_layers < args.n_layers:
        sizes["n_routed_experts"] = args.n_routed_experts
        if args.n_shared_experts:
            sizes["n_shared_experts * moe_intermediate_size (shared-expert width)"] = \
                args.n_shared_experts * args.moe_inter_dim
    for what, n in sizes.items():
        if n % tp:
            raise ValueError(f"{flag} {tp} does not divide {what} = {n}")


def plan_tp(infos: dict[str, TensorInfo], args: ModelArgs, tp: int) -> dict[str, dict]:
    """The manifest entry of every tensor: {"shape", "split_dim"} or {"shape", "rank"} for routed experts."""
    block = args.quant.block_size if args.quant else (128, 128)
    per_rank = args.n_routed_experts // tp if args.n_routed_experts else 0
    entries = {}
    for name, info in infos.items():
        if _IGNORED.search(name):
            continue
        kind, x = shard_rule(name)
        if kind == "expert":
            if x >= args.n_routed_experts:
                raise ValueError(f"{name} names expert {x}, but n_routed_experts = {args.n_routed_experts}")
            entries[name] = {"shape": list(info.shape), "rank": x // per_rank}
            continue
        if x is not None:
            if name.endswith("weight_scale_inv"):
                weight = infos.get(name.removesuffix("_scale_inv"))
                size = weight.shape[x] if weight is not None else 0
                if size % (tp * block[x]):
                    raise ValueError(f"--tp {tp} would cut the FP8 scale blocks of {name.removesuffix('_scale_inv')}"
                                     f": dim {x} has {info.shape[x]} blocks of {block[x]} (size {size}); each rank "
                                     f"needs whole blocks, so the size must be a multiple of {tp} x {block[x]}")
            if x >= len(info.shape) or info.shape[x] % tp:
                raise ValueError(f"--tp {tp} does not divide dim {x} of {name} (shape {list(info.shape)})")
        entries[name] = {"shape": list(info.shape), "split_dim": x}
    return entries


def _slice(tensor, entry: dict, rank: int, tp: int):
    dim = entry.get("split_dim")
    if dim is None:
        return tensor
    n = tensor.shape[dim] // tp
    return tensor.narrow(dim, rank * n, n)


def _holds(entry: dict, rank: int) -> bool:
    return entry.get("rank", rank) == rank


def convert_checkpoint(src: str | Path, dst: str | Path, tp: int, force: bool = False,
                       progress: bool = True) -> Path:
    """Write `src` as `tp` rank files plus config, tokenizer and the `dsinfer_tp.json` manifest into `dst`."""
    src, cfg = read_config(src)
    if (src / TP_MANIFEST).is_file():
        raise ValueError(f"{src} is already a tensor-parallel folder (it has {TP_MANIFEST}); convert the original")
    args = ModelArgs.from_hf_config(cfg)
    check_tp(args, tp)
    files = checkpoint_files(src)
    infos = read_headers(files)
    entries = plan_tp(infos, args, tp)
    by_file: dict[Path, list[str]] = {f: [] for f in files}
    for name, info in infos.items():                 # read each file in the order its header lists tensors
        if name in entries:
            by_file[info.file].append(name)
    order = [n for f in files for n in by_file[f]]

    specs = [[] for _ in range(tp)]
    for name in order:
        e, info = entries[name], infos[name]
        for r in range(tp):
            if _holds(e, r):
                shape = list(info.shape)
                if e.get("split_dim") is not None:
                    shape[e["split_dim"]] //= tp
                specs[r].append(TensorSpec(name, info.dtype, tuple(shape)))

    manifest = {"format": "dsinfer-tp", "version": 1, "tp_size": tp,
                "rank_files": [rank_file(r, tp) for r in range(tp)],
                "experts_per_rank": args.n_routed_experts // tp if args.n_routed_experts else 0,
                "tensors": {n: entries[n] for n in order}}
    with CheckpointWriter(src, dst, force) as out:
        out.check_space(sum(s.nbytes for rank in specs for s in rank))
        streams = [out.open_file(rank_file(r, tp), specs[r]) for r in range(tp)]
        bar = tqdm(total=sum(infos[n].nbytes for n in order), unit="B", unit_scale=True,
                   desc=f"Converting to tp={tp}", disable=not progress)
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in by_file[file]:
                    tensor = f.get_tensor(name)
                    for r in range(tp):
                        if _holds(entries[name], r):
                            streams[r].write(name, _slice(tensor, entries[name], r, tp))
                    bar.update(infos[name].nbytes)
        bar.close()
        out.finish(cfg, index=False, extra_json={TP_MANIFEST: manifest})
    return out.dst

