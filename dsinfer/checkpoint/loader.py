"""Load a Hugging Face checkpoint directory into a model built on the meta device.

Two passes: the safetensors headers are read and checked against the model first (unknown, missing and
mis-shaped tensors are reported before any data is read), then each tensor is read once and placed into its
parameter, so at most one tensor exists twice in memory at any time. FP8 weights stay FP8.

A folder written by `dsinfer convert` (per-rank files and a `dsinfer_tp.json` manifest) loads too: each split
tensor is read from every rank file and concatenated along its split dim, so one process gets the whole model.

Under tensor parallelism (a `ParallelState` of n ranks) every rank reads only its own part: from a Hugging Face
folder, the byte ranges of its slice of each split tensor (`convert.SPLIT_DIMS`; FP8 scales cut on block
boundaries) and only its own routed experts; from a `dsinfer convert --tp n` folder, its own rank file as it is.
Shapes are checked against the whole tensors, so messages name checkpoint shapes whatever n is.
"""

from __future__ import annotations

import json
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm

from ..models.args import ModelArgs
from ..models.layers import Linear
from ..models.moe import Experts
from ..models.registry import model_class
from ..parallel import ParallelState
from .names import Target, hf_to_native, native_to_hf

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn,
           "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8}
TP_MANIFEST = "dsinfer_tp.json"        # written by `dsinfer convert`: how the rank files split each tensor
ITEMSIZE = {"F8_E4M3": 1, "I8": 1, "U8": 1, "F16": 2, "BF16": 2, "F32": 4, "I32": 4, "F64": 8, "I64": 8}


@dataclass
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str            # safetensors dtype string ("BF16", "F8_E4M3", ...)
    parts: tuple[Path, ...] = ()     # tensor-parallel folder: the rank files whose slices concatenate to it
    split_dim: int | None = None     # ... along this dim
    local: bool = False              # `file` holds exactly this rank's part (a convert rank file); shape is whole

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE.get(self.dtype, 4)
        for d in self.shape:
            n *= d
        return n


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those named by `model.safetensors.index.json`, or the one file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e})") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"checkpoint shard(s) listed in {index.name} are missing: {', '.join(missing[:5])}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no safetensors weights in {path} (expected model.safetensors or "
                         "model.safetensors.index.json with shards; pickled .bin checkpoints are not loaded)")
    if len(files) > 1:
        raise ValueError(f"{path} holds {len(files)} safetensors files but no model.safetensors.index.json")
    return files


def refuse_unknown(unknown: list[str]) -> None:
    """One line for checkpoint tensors the model has no place for (usually a config.json from another model)."""
    if unknown:
        raise ValueError(f"checkpoint has {len(unknown)} tensor(s) this model does not use, e.g. "
                         f"{', '.join(unknown[:3])}; does config.json belong to these weights?")


def read_headers(files: list[Path]) -> dict[str, TensorInfo]:
    """Name -> TensorInfo for every tensor, reading only the headers."""
    infos: dict[str, TensorInfo] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    s = f.get_slice(name)
                    infos[name] = TensorInfo(file, tuple(s.get_shape()), s.get_dtype())
        except SafetensorError as e:
            raise ValueError(f"cannot read {file}: it is truncated or not a safetensors file ({e})") from None
    return infos


def checkpoint_tensors(path: Path, rank: int = 0, world_size: int = 1) -> dict[str, TensorInfo]:
    """Name -> TensorInfo for every tensor of a checkpoint folder (HF safetensors or `dsinfer convert` output).
    With world_size > 1, a convert folder must have been written for that many ranks; its tensors then point at
    this rank's file (`local`)."""
    if (path / TP_MANIFEST).is_file():
        return _tp_tensors(path) if world_size == 1 else _tp_rank_tensors(path, rank, world_size)
    return read_headers(checkpoint_files(path))


def _tp_rank_tensors(path: Path, rank: int, world_size: int) -> dict[str, TensorInfo]:
    """The tensors of one rank of a `dsinfer convert` folder: whole shapes from the manifest, data in its file."""
    manifest = path / TP_MANIFEST
    try:
        m = json.loads(manifest.read_text())
        tp, files, entries = int(m["tp_size"]), [path / f for f in m["rank_files"]], m["tensors"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{manifest} is not a valid dsinfer tensor-parallel manifest ({e})") from None
    if tp != world_size or len(files) != tp:
        raise ValueError(f"{path} was converted for --tp {tp}, but this run has --tp {world_size}; use --tp {tp}, "
                         f"or convert the original checkpoint again with --tp {world_size}")
    if not files[rank].is_file():
        raise ValueError(f"rank file {files[rank].name} listed in {TP_MANIFEST} is missing")
    own = read_headers([files[rank]])
    infos = {}
    for name, e in entries.items():
        dim, owner = e.get("split_dim"), e.get("rank", rank)
        shape = list(e["shape"])
        if owner != rank:                   # another rank's routed expert: never read here
            infos[name] = TensorInfo(files[owner], tuple(shape), "?")
            continue
        if name not in own:
            raise ValueError(f"{files[rank].name} lacks {name}, which {TP_MANIFEST} lists")
        part = list(shape)
        if dim is not None:
            part[dim] //= tp
        if list(own[name].shape) != part:
            raise ValueError(f"{files[rank].name} holds {name} with shape {list(own[name].shape)}, but "
                             f"{TP_MANIFEST} implies {part}")
        infos[name] = TensorInfo(files[rank], tuple(shape), own[name].dtype, split_dim=dim, local=True)
    return infos


def _tp_tensors(path: Path) -> dict[str, TensorInfo]:
    """The whole tensors of a `dsinfer convert` folder: split ones point at every rank file, others at one."""
    manifest = path / TP_MANIFEST
    try:
        m = json.loads(manifest.read_text())
        files = [path / f for f in m["rank_files"]]
        entries = m["tensors"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{manifest} is not a valid dsinfer tensor-parallel manifest ({e})") from None
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"rank file(s) listed in {TP_MANIFEST} are missing: {', '.join(missing[:5])}")
    ranks = [read_headers([f]) for f in files]
    infos = {}
    for name, e in entries.items():
        dim, rank = e.get("split_dim"), e.get("rank", 0)
        held = [r for r in (range(len(files)) if dim is not None else [rank]) if name not in ranks[r]]
        if held:
            raise ValueError(f"{files[held[0]].name} lacks {name}, which {TP_MANIFEST} lists")
        first = ranks[0 if dim is not None else rank][name]
        shape = list(first.shape)
        if dim is not None:
            shape[dim] = sum(ranks[r][name].shape[dim] for r in range(len(files)))
        if shape != list(e["shape"]):
            raise ValueError(f"the rank slices of {name} make shape {shape}, but {TP_MANIFEST} says {e['shape']}")
        parts = tuple(files) if dim is not None else ()
        infos[name] = TensorInfo(first.file, tuple(shape), first.dtype, parts, dim)
    return infos


def _expected_scale_shape(weight_shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    n, k = weight_shape
    return (-(-n // block[0]), -(-k // block[1]))


def _quantizable(model: nn.Module) -> dict[str, str]:
    """Weight name -> the name of its FP8 scale slot, for every weight that may be stored in FP8."""
    slots = {}
    for name, m in model.named_modules():
        if isinstance(m, Linear):
            slots[f"{name}.weight"] = f"{name}.scale"
        elif isinstance(m, Experts):
            slots.update({f"{name}.{w}": f"{name}.{w}_scale" for w in ("w1", "w2", "w3")})
    return slots


def _split_dim(hf_name: str, t: Target, world_size: int) -> int | None:
    """The dim this tensor is cut along between ranks (None: whole on every rank; routed experts are whole)."""
    if world_size == 1 or t.expert is not None:
        return None
    from .convert import shard_rule  # convert imports this module
    return shard_rule(hf_name)[1]


def _allowed_sizes(size: int, unit: int = 1) -> str:
    return ", ".join(str(n) for n in range(1, 65) if size % (n * unit) == 0)


def _is_local_expert(model: nn.Module, t: Target) -> bool:
    experts = model.get_submodule(t.name.rpartition(".")[0])
    return experts.first <= t.expert < experts.first + experts.n_local


def plan_load(model: nn.Module, infos: dict[str, TensorInfo], n_layers: int,
              block: tuple[int, int], parallel: ParallelState | None = None) -> dict[str, Target]:
    """Check the checkpoint against the model; return HF name -> Target for every tensor this rank loads
    (under expert parallelism, only its own routed experts). The model holds this rank's slices; `infos` and
    the messages are about whole tensors."""
    n = (parallel or ParallelState.single()).world_size
    params = dict(model.named_parameters())
    stacked = {n for n in params if isinstance(model.get_submodule(n.rpartition(".")[0]), Experts)}
    scale_slot = _quantizable(model)
    scale_owner = {v: k for k, v in scale_slot.items()}

    plan: dict[str, Target] = {}
    unknown = []
    for hf_name in infos:
        target = hf_to_native(hf_name, n_layers)
        if target is None:
            continue
        if target.name in params or target.name in scale_owner:
            if target.expert is None or _is_local_expert(model, target):
                plan[hf_name] = target
        else:
            unknown.append(hf_name)
    refuse_unknown(unknown)

    info_of = {(t.name, t.expert): infos[h] for h, t in plan.items()}
    def expert_ids(name: str):
        experts = model.get_submodule(name.rpartition(".")[0])
        return range(experts.first, experts.first + experts.n_local)

    missing = [native_to_hf(name, e) for name in params
               for e in (expert_ids(name) if name in stacked else [None]) if (name, e) not in info_of]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")

    for hf_name, t in plan.items():
        info = infos[hf_name]
        if info.dtype not in _DTYPES:
            raise ValueError(f"tensor {hf_name} has unsupported dtype {info.dtype}")
        if t.name in scale_owner:
            weight = info_of.get((scale_owner[t.name], t.expert))
            if weight is None or weight.dtype != "F8_E4M3":
                raise ValueError(f"{hf_name} is a block scale but its weight is not float8_e4m3fn")
            want = _expected_scale_shape(weight.shape, block)
        else:
            p = params[t.name]
            want = tuple(p.shape[1:] if t.expert is not None else p.shape)
            if info.dtype == "F8_E4M3":
                if t.name not in scale_slot:
                    raise ValueError(f"{hf_name} is float8_e4m3fn, but DeepSeek checkpoints keep it in bf16")
                if (scale_slot[t.name], t.expert) not in info_of:
                    raise ValueError(f"{hf_name} is float8_e4m3fn but its weight_scale_inv is missing")
            dim = _split_dim(hf_name, t, n)
            if dim is not None:
                if dim >= len(info.shape):
                    raise ValueError(f"tensor {hf_name} has shape {list(info.shape)}, which has no dim {dim} to "
                                     "split between ranks")
                size, unit = info.shape[dim], (block[dim] if info.dtype == "F8_E4M3" else 1)
                if size % (n * unit):
                    whole = f" into whole FP8 blocks of {unit}" if unit > 1 else ""
                    raise ValueError(f"tensor-parallel size {n} cannot split {hf_name} (dim {dim} of size {size})"
                                     f"{whole}; allowed sizes: {_allowed_sizes(size, unit)}")
                want = tuple(w * n if d == dim else w for d, w in enumerate(want))   # the whole tensor's shape
        if tuple(info.shape) != want:
            raise ValueError(f"tensor {hf_name} has shape {list(info.shape)}, expected {list(want)}")
    return plan


def load_weights(model: nn.Module, path: Path, n_layers: int, device: torch.device,
                 block: tuple[int, int] = (128, 128), progress: bool = True,
                 parallel: ParallelState | None = None) -> None:
    """Fill a meta-device `model` from the checkpoint at `path`, in place (this rank's part under `parallel`)."""
    parallel = parallel or ParallelState.single()
    rank, n = parallel.rank, parallel.world_size
    infos = checkpoint_tensors(path, rank, n)
    plan = plan_load(model, infos, n_layers, block, parallel)
    params = dict(model.named_parameters())
    total = sum(infos[h].nbytes for h in plan)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="Loading weights", disable=not progress, leave=False)
    open_device = str(device) if device.type == "cuda" else "cpu"
    by_file: dict[Path, list[str]] = {}
    for hf_name in plan:
        by_file.setdefault(infos[hf_name].file, []).append(hf_name)
    for file, names in by_file.items():                 # one shard open at a time (plus its rank siblings)
        with ExitStack() as stack:
            handles: dict[Path, object] = {}

            def read(f: Path, name: str, dim: int | None = None) -> torch.Tensor:
                """The whole tensor, or this rank's 1/n along `dim` (only those bytes are read)."""
                try:
                    if f not in handles:
                        handles[f] = stack.enter_context(safe_open(f, framework="pt", device=open_device))
                    if dim is None:
                        return handles[f].get_tensor(name)
                    part = handles[f].get_slice(name)
                    size = part.get_shape()[dim] // n
                    index = [slice(None)] * len(part.get_shape())
                    index[dim] = slice(rank * size, (rank + 1) * size)
                    return part[tuple(index)]
                except SafetensorError as e:
                    raise ValueError(f"cannot read {f}: {e}") from None

            for hf_name in names:
                info = infos[hf_name]
                if info.local:                  # a convert rank file: this rank's part as it is
                    tensor = read(file, hf_name)
                elif info.parts:                # a convert folder loaded whole by one process
                    tensor = torch.cat([read(p, hf_name) for p in info.parts], dim=info.split_dim)
                else:
                    tensor = read(file, hf_name, _split_dim(hf_name, plan[hf_name], n))
                _place(model, params, plan[hf_name], tensor, device)
                bar.update(info.nbytes)
    bar.close()


def _place(model: nn.Module, params: dict, t: Target, tensor: torch.Tensor, device: torch.device) -> None:
    """Put one tensor into its parameter: model dtype (as built), FP8 kept as is, scales float32."""
    owner_name, _, attr = t.name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if t.name not in params:                       # an FP8 block scale
        want = torch.float32
    elif tensor.dtype == torch.float8_e4m3fn:
        want = tensor.dtype
    else:
        want = params[t.name].dtype
    tensor = tensor.to(device=device, dtype=want)
    if t.expert is None:
        setattr(owner, attr, nn.Parameter(tensor, requires_grad=False))
        return
    put_expert(owner, attr, t.expert - owner.first, owner.n_local, tensor, t.name)


def put_expert(owner: nn.Module, attr: str, index: int, n: int, tensor: torch.Tensor, name: str) -> None:
    """Copy one expert's tensor into row `index` of the stack owner.attr, first made (n, *tensor.shape) in the
    tensor's dtype; a later expert of another dtype or shape is refused."""
    stack = getattr(owner, attr)
    if stack is None or stack.is_meta:
        stack = nn.Parameter(torch.empty(n, *tensor.shape, dtype=tensor.dtype, device=tensor.device),
                             requires_grad=False)
        setattr(owner, attr, stack)
    elif stack.dtype != tensor.dtype or tuple(stack.shape[1:]) != tuple(tensor.shape):
        raise ValueError(f"experts of {name} mix formats ({stack.dtype} {tuple(stack.shape[1:])} and "
                         f"{tensor.dtype} {tuple(tensor.shape)})")
    stack.data[index].copy_(tensor)


def read_config(path: str | Path) -> tuple[Path, dict]:
    """Validate a checkpoint directory and parse its config.json."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"model path {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"model path {path} is not a directory (pass the checkpoint folder)")
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{path} has no config.json; is it a Hugging Face checkpoint folder?")
    try:
        return path, json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config} is not valid JSON ({e})") from None


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(args: ModelArgs, dtype: torch.dtype, attn_impl: str = "absorb",
                parallel: ParallelState | None = None) -> nn.Module:
    """The model for `args` on the meta device (this rank's part of it under `parallel`)."""
    cls = model_class(args)
    with torch.device("meta"), _default_dtype(dtype):
        if parallel is None or parallel.world_size == 1:
            return cls(args, attn_impl)
        try:
            return cls(args, attn_impl, parallel=parallel)
        except TypeError:
            raise ValueError(f"model_type {args.model_type!r} does not support tensor parallelism yet") from None


def load_model(path: str | Path, dtype: torch.dtype, device: torch.device, attn_impl: str = "absorb",
               progress: bool = True, parallel: ParallelState | None = None) -> tuple[nn.Module, ModelArgs]:
    """Build the model for `path`'s config.json on the meta device and fill it from the checkpoint (only this
    rank's part under `parallel`)."""
    path, cfg = read_config(path)
    args = ModelArgs.from_hf_config(cfg)
    model = build_model(args, dtype, attn_impl, parallel)
    block = args.quant.block_size if args.quant else (128, 128)
    load_weights(model, path, args.n_layers, device, block, progress, parallel)
    return model.eval(), args
