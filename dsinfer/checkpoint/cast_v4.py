"""`dsinfer cast` for DeepSeek-V4 checkpoints (spec section 3.4), as DeepSeek publishes them or as transformers
writes them.

- `--to fp8`: the routed experts' packed FP4 (int8 e2m1 codes, one E8M0 scale per row and 32 inputs) become FP8
  e4m3 with one E8M0 scale per 128x128 tile, as the reference's `convert.py --expert-dtype fp8` makes them: a
  tile's scale is its largest 32-input scale over 64, and every value is re-expressed exactly against it
  (`kernels.fp4.fp4_to_fp8_torch`; a tile that cannot be repacked exactly is an error, never a silent loss).
  Everything else is copied; config.json says `expert_dtype: "fp8"`.
- `--to bf16`: every quantized weight (FP8 e4m3 with E8M0 or float32 block scales, packed FP4 with E8M0 scales)
  is dequantized to bf16 and its scale dropped. An e4m3 or e2m1 value times a power-of-two scale is a bf16
  number, so nothing rounds. config.json loses `quantization_config` and `expert_dtype`.

As for V3, each output shard has the name and the tensors of one input shard, is planned from the headers and
written tensor by tensor into a hidden folder that is renamed into place at the end (`writer.py`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..kernels.fp4 import FP4_BLOCK, e8m0_to_float, fp4_dequant_torch, fp4_to_fp8_torch
from ..kernels.fp8 import weight_dequant_torch
from ..models.args_v4 import ModelArgsV4
from .loader import TensorInfo
from .writer import TensorSpec, write_shard_by_shard

_PACKED = ("I8", "U8")
_BYTE_SCALES = ("F8_E8M0", "U8")


def _scale_name(name: str, infos: dict[str, TensorInfo]) -> str | None:
    """The scale beside a weight: `X.scale` for `X.weight` (the release), `X.weight_scale_inv` (transformers)."""
    for candidate in (name.removesuffix(".weight") + ".scale" if name.endswith(".weight") else None,
                      name + "_scale_inv"):
        if candidate in infos:
            return candidate
    return None


def quantized_weights(infos: dict[str, TensorInfo]) -> dict[str, tuple[str, str]]:
    """Weight name -> ("fp8" or "fp4", its scale's name) for every quantized weight; ValueError for a quantized
    weight without its scale, or an FP4 scale of the wrong dtype or shape."""
    out = {}
    for name, info in infos.items():
        if info.dtype not in ("F8_E4M3", *_PACKED):
            continue
        scale = _scale_name(name, infos)
        if scale is None:
            if info.dtype == "F8_E4M3":
                raise ValueError(f"{name} is float8_e4m3fn but its scale is missing")
            continue                                               # an int8/uint8 tensor that is not a weight
        if info.dtype in _PACKED:
            s = infos[scale]
            want = (info.shape[0], 2 * info.shape[1] // FP4_BLOCK) if len(info.shape) == 2 else None
            if s.dtype not in _BYTE_SCALES or tuple(s.shape) != want:
                raise ValueError(f"{name} is packed FP4 of shape {list(info.shape)}, but its scale {scale} is "
                                 f"{s.dtype} {list(s.shape)}; expected E8M0 bytes of shape {list(want or [])}")
        elif len(info.shape) != 2:
            raise ValueError(f"{name}: only 2-D FP8 weights can be cast, got shape {list(info.shape)}")
        out[name] = ("fp4" if info.dtype in _PACKED else "fp8", scale)
    return out


def cast_v4(src: Path, cfg: dict, files: list[Path], infos: dict[str, TensorInfo], dst: str | Path, to: str,
            force: bool, progress: bool) -> Path:
    """Write the V4 checkpoint at `src` with its FP4 experts repacked as FP8 (`to="fp8"`) or every quantized
    weight dequantized (`to="bf16"`); see the module docstring."""
    args = ModelArgsV4.from_hf_config(cfg)
    block = args.quant.block_size if args.quant else (128, 128)
    quant = quantized_weights(infos)
    if to == "bf16" and not quant:
        raise ValueError(f"{src} has no FP8 or FP4 weights; there is nothing to dequantize")
    if to == "fp8" and not any(kind == "fp4" for kind, _ in quant.values()):
        raise ValueError(f"{src} has no FP4 experts to repack as FP8 (DeepSeek-V4 casts take the published FP4 "
                         "experts to fp8, or dequantize everything to bf16)")
    dropped = {scale for kind, scale in quant.values() if to == "bf16" or kind == "fp4"}

    plans: dict[Path, list[tuple[str, list[TensorSpec]]]] = {f: [] for f in files}
    for name, info in infos.items():
        kind = quant.get(name, (None, None))[0]
        if name in dropped:
            out = []                                           # written with its weight, or not at all
        elif kind == "fp4":
            shape = (info.shape[0], 2 * info.shape[1])
            if to == "bf16":
                out = [TensorSpec(name, "BF16", shape)]
            else:
                tiles = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
                out = [TensorSpec(name, "F8_E4M3", shape), TensorSpec(quant[name][1], "F8_E8M0", tiles)]
        elif kind == "fp8" and to == "bf16":
            out = [TensorSpec(name, "BF16", info.shape)]
        else:
            out = [TensorSpec(name, info.dtype, info.shape)]
        plans[info.file].append((name, out))

    if to == "fp8":
        cfg = {**cfg, "expert_dtype": "fp8"}
        if isinstance(cfg.get("quantization_config"), dict) and "expert_dtype" in cfg["quantization_config"]:
            cfg["quantization_config"] = {**cfg["quantization_config"], "expert_dtype": "fp8"}
    else:
        cfg = {k: v for k, v in cfg.items() if k not in ("quantization_config", "expert_dtype")}
    def convert(name, tensor, read, stream):
        kind, scale_name = quant.get(name, (None, None))
        if kind == "fp4" and to == "fp8":
            q, s = fp4_to_fp8_torch(tensor, read(scale_name), block)
            stream.write(name, q)
            stream.write(scale_name, s.view(torch.float8_e8m0fnu))
        elif kind == "fp4":
            stream.write(name, fp4_dequant_torch(tensor, read(scale_name), torch.bfloat16))
        elif kind == "fp8" and to == "bf16":
            scale = read(scale_name)
            scale = scale.float() if scale.dtype == torch.float32 else e8m0_to_float(scale)
            stream.write(name, weight_dequant_torch(tensor, scale, block, torch.bfloat16))
        else:
            stream.write(name, tensor)

    return write_shard_by_shard(src, dst, force, plans, infos, cfg, f"Casting to {to}", progress, convert)
