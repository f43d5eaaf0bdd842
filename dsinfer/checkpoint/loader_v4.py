"""Load a DeepSeek-V4 checkpoint (DeepSeek's release or a transformers save) into a meta-built V4 model.

As for V3: every header is checked against the model first (unknown, missing, mis-shaped tensors, scales
without their weights), then each tensor is read once and placed. Formats stay as stored:
- FP8 e4m3 weights stay FP8; their block scales (one-byte E8M0 in the release, float32 elsewhere) become
  float32, which is exact for powers of two and is what the FP8 linear paths take.
- Routed experts in FP4 (int8 bytes, two e2m1 codes each) stay packed (uint8), with their E8M0 scales kept as
  bytes (uint8), one per 32 inputs.
- Everything else takes the dtype the model declares: float32 for norms, hyper-connection weights, sinks,
  compressor weights and position biases, the router weight and bias; the model dtype for the rest.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm

from ..kernels.fp4 import FP4_BLOCK, e8m0_to_float
from ..models.args_v4 import ModelArgsV4
from ..models.deepseek_v4 import Transformer
from ..models.layers import Linear
from ..models.v4_moe import Experts
from .loader import TensorInfo, _default_dtype, checkpoint_tensors, put_expert, read_config, refuse_unknown
from .names_v4 import TargetV4, checkpoint_format, native_to_reference, to_native

_FLOAT = {"F32", "BF16", "F16", "F64"}
_PACKED = {"I8", "U8"}                     # FP4: two e2m1 codes per byte
_SCALES = {"F8_E8M0", "F32", "U8"}
_BYTES = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "BF16": 2, "F16": 2}


def _scale_slots(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Scale slot name -> (its weight's name, the owning module) for every weight that may be quantized."""
    slots = {}
    for name, m in model.named_modules():
        if isinstance(m, Linear):
            slots[f"{name}.scale"] = (f"{name}.weight", m)
        elif isinstance(m, Experts):
            slots.update({f"{name}.{w}_scale": (f"{name}.{w}", m) for w in ("w1", "w2", "w3")})
    return slots


def _blocks(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    return (-(-shape[-2] // block[0]), -(-shape[-1] // block[1]))


def plan_load_v4(model: Transformer, infos: dict[str, TensorInfo],
                 args: ModelArgsV4) -> dict[str, list[TargetV4]]:
    """Check the checkpoint against the model; return checkpoint name -> its targets, for every tensor to load."""
    fmt = checkpoint_format(infos)
    params = dict(model.named_parameters())
    slots = _scale_slots(model)
    block = args.quant.block_size if args.quant else (128, 128)
    plan, unknown = {}, []
    for name in infos:
        targets = to_native(name, fmt, args.n_layers)
        if all(t.name in params or t.name in slots for t in targets):
            if targets:
                plan[name] = targets
        else:
            unknown.append(name)
    refuse_unknown(unknown)

    given = {}                                           # (native name, expert or None) -> TensorInfo
    for name, targets in plan.items():
        for t in targets:
            given[(t.name, t.expert)] = infos[name]
    stacked = {n for n in params if isinstance(model.get_submodule(n.rpartition(".")[0]), Experts)}
    missing = []
    for n, p in params.items():
        if (n, None) in given:
            continue
        experts = range(p.shape[0]) if n in stacked else [None]
        missing += [native_to_reference(n, e) for e in experts if (n, e) not in given]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")

    for name, targets in plan.items():
        info = infos[name]
        for t in targets:
            want = _expected_shape(t, info, params, slots, given, stacked, block, name)
            if tuple(info.shape) != want:
                raise ValueError(f"tensor {name} has shape {list(info.shape)}, expected {list(want)}")
    return plan


def _expected_shape(t: TargetV4, info: TensorInfo, params: dict, slots: dict, given: dict, stacked: set[str],
                    block: tuple[int, int], name: str) -> tuple[int, ...]:
    if t.name in slots:                                                  # a scale: shaped by its weight
        weight_name, _ = slots[t.name]
        weight = given.get((weight_name, t.expert))
        if info.dtype not in _SCALES or weight is None or weight.dtype not in ("F8_E4M3", *_PACKED):
            raise ValueError(f"{name} is a scale, but its weight is not FP8 e4m3 or packed FP4 (or the scale "
                             f"dtype {info.dtype} is not E8M0/F32)")
        if weight.dtype == "F8_E4M3":
            return _blocks(weight.shape, block)
        if info.dtype == "F32":
            raise ValueError(f"{name}: FP4 expert scales must be E8M0 bytes, got F32")
        return (weight.shape[-2], weight.shape[-1] * 2 // FP4_BLOCK)
    p = params[t.name]
    shape = tuple(p.shape[1:]) if t.expert is not None else tuple(p.shape)
    if info.dtype in _PACKED and t.name in stacked:
        if (t.name + "_scale", t.expert) not in given:
            raise ValueError(f"{name} is packed FP4 but its scale is missing")
        return (*shape[:-1], shape[-1] // 2)
    if info.dtype == "F8_E4M3":
        scale = t.name.removesuffix(".weight") + ".scale" if t.name.endswith(".weight") else t.name + "_scale"
        if scale not in slots:
            raise ValueError(f"{name} is float8_e4m3fn, but DeepSeek-V4 checkpoints keep it in bf16/fp32")
        if (scale, t.expert) not in given:
            raise ValueError(f"{name} is float8_e4m3fn but its scale is missing")
    elif info.dtype not in _FLOAT and not (t.name.endswith("tid2eid") and info.dtype in ("I32", "I64")):
        raise ValueError(f"tensor {name} has unsupported dtype {info.dtype}")
    if t.part is not None:                                               # HF gate_up_proj: both halves stacked
        return (shape[0], 2 * shape[1], shape[2])
    return shape


def load_weights_v4(model: Transformer, path: Path, args: ModelArgsV4, device: torch.device,
                    progress: bool = True) -> None:
    """Fill a meta-device V4 `model` from the checkpoint at `path`, in place."""
    infos = checkpoint_tensors(path)
    plan = plan_load_v4(model, infos, args)
    params = dict(model.named_parameters())
    slots = _scale_slots(model)
    packed = {(t.name, t.expert) for name, ts in plan.items() for t in ts if infos[name].dtype in _PACKED}

    def nbytes(info: TensorInfo) -> int:
        n = _BYTES.get(info.dtype, 1)
        for d in info.shape:
            n *= d
        return n

    bar = tqdm(total=sum(nbytes(infos[n]) for n in plan), unit="B", unit_scale=True, desc="Loading weights",
               disable=not progress, leave=False)
    open_device = str(device) if device.type == "cuda" else "cpu"
    by_file: dict[Path, list[str]] = {}
    for name in plan:
        by_file.setdefault(infos[name].file, []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(file, framework="pt", device=open_device) as f:
                for name in names:
                    info = infos[name]
                    if info.parts:
                        raise ValueError(f"{path} is a tensor-parallel folder; V4 loads unsplit checkpoints only")
                    tensor = f.get_tensor(name)
                    for t in plan[name]:
                        _place(model, params, slots, packed, t, tensor, device)
                    bar.update(nbytes(info))
        except SafetensorError as e:
            raise ValueError(f"cannot read {file}: {e}") from None
    bar.close()


def _place(model: nn.Module, params: dict, slots: dict, packed: set, t: TargetV4, tensor: torch.Tensor,
           device: torch.device) -> None:
    """Put one tensor (or half of one) into its parameter, converting as the module docstring says; `packed`
    holds the (name, expert) of every packed FP4 weight."""
    owner_name, _, attr = t.name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if t.name in slots:
        fp4 = (slots[t.name][0], t.expert) in packed
        if fp4:
            tensor = tensor.view(torch.uint8)
        elif tensor.dtype in (torch.float8_e8m0fnu, torch.uint8):
            tensor = e8m0_to_float(tensor)
        want = torch.uint8 if fp4 else torch.float32
    elif tensor.dtype == torch.float8_e4m3fn:
        want = tensor.dtype
    elif tensor.dtype in (torch.int8, torch.uint8):
        tensor, want = tensor.view(torch.uint8), torch.uint8
    else:
        want = params[t.name].dtype
    if t.part is not None:
        tensor = tensor.chunk(2, dim=-2)[t.part]
    tensor = tensor.to(device=device, dtype=want)
    if t.expert is None:
        setattr(owner, attr, nn.Parameter(tensor.contiguous(), requires_grad=False))
        return
    put_expert(owner, attr, t.expert, owner.n_experts, tensor, t.name)


def load_model_v4(path: str | Path, dtype: torch.dtype, device: torch.device, simulate_qat: bool = True,
                  progress: bool = True) -> tuple[Transformer, ModelArgsV4]:
    """Build the V4 model for `path`'s config.json on the meta device and fill it from the checkpoint."""
    path, cfg = read_config(path)
    args = ModelArgsV4.from_hf_config(cfg)
    with torch.device("meta"), _default_dtype(dtype):
        model = Transformer(args, simulate_qat)
    load_weights_v4(model, path, args, device, progress)
    return model.eval(), args
