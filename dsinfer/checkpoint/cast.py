"""`dsinfer cast`: FP8 checkpoint -> BF16, or BF16 (or FP32) checkpoint -> the published FP8 format. DeepSeek-V4
checkpoints go to `cast_v4.py` (FP4 experts -> FP8, or everything -> BF16).

FP8 format (DeepSeek V3 / R1 / V3.1): e4m3 weights with a float32 `weight_scale_inv` per 128x128 block, ragged
edge blocks included; W = q * s (`kernels.fp8`). Only the weights DeepSeek ships in FP8 are quantized: every
attention projection (`q_proj`, `q_a_proj`, `q_b_proj`, `kv_a_proj_with_mqa`, `kv_b_proj`, `o_proj`) and every
MLP projection (dense, shared and routed experts), in the main layers and in the MTP layer. The embedding, the
LM head, the norms, the router weight, its float32 correction bias and the MTP `eh_proj` / `shared_head` keep
their dtype. Casting to BF16 dequantizes exactly as `weight_dequant_torch` does and leaves every other tensor
as it is.

Each output shard has the name and the tensors of one input shard; it is written tensor by tensor (see
`writer.py`), so memory stays at about one tensor whatever the checkpoint size.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..kernels.fp8 import weight_dequant_torch, weight_quant_torch
from ..models.args import ModelArgs
from .loader import TP_MANIFEST, checkpoint_files, read_config, read_headers
from .writer import TensorSpec, write_shard_by_shard

TARGETS = ("bf16", "fp8")
SCALE_FMTS = ("ue8m0",)
BLOCK = (128, 128)
_FP8_WEIGHT = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj"
                         r"|o_proj)|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$")
_FLOAT = ("F32", "F16", "BF16")


def is_fp8_weight(name: str) -> bool:
    """Whether DeepSeek's FP8 releases store this HF tensor in float8_e4m3fn (with a `weight_scale_inv`)."""
    return _FP8_WEIGHT.match(name) is not None


def quantization_config(scale_fmt: str | None = None) -> dict:
    """The `quantization_config` of config.json for the published FP8 format."""
    q = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(BLOCK)}
    if scale_fmt:
        q["scale_fmt"] = scale_fmt
    return q


def cast_checkpoint(src: str | Path, dst: str | Path, to: str, scale_fmt: str | None = None, force: bool = False,
                    progress: bool = True) -> Path:
    """Write `src` with its FP8 weights dequantized (`to="bf16"`) or its BF16 weights quantized (`to="fp8"`); for
    DeepSeek-V4, see `cast_v4`."""
    if to not in TARGETS:
        raise ValueError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    if scale_fmt is not None and (scale_fmt not in SCALE_FMTS or to != "fp8"):
        raise ValueError(f"--scale-fmt takes {', '.join(SCALE_FMTS)} and only goes with --to fp8")
    src, cfg = read_config(src)
    if (src / TP_MANIFEST).is_file():
        raise ValueError(f"{src} is a tensor-parallel folder (it has {TP_MANIFEST}); cast the original checkpoint")
    files = checkpoint_files(src)
    infos = read_headers(files)
    if cfg.get("model_type") == "deepseek_v4":
        if scale_fmt is not None:
            raise ValueError("--scale-fmt is for V3-style FP8 quantization; DeepSeek-V4 scales are E8M0 already")
        from .cast_v4 import cast_v4
        return cast_v4(src, cfg, files, infos, dst, to, force, progress)
    args = ModelArgs.from_hf_config(cfg)
    block = args.quant.block_size if args.quant else BLOCK
    fp8 = [n for n, i in infos.items() if i.dtype == "F8_E4M3"]
    if to == "bf16":
        if not fp8:
            raise ValueError(f"{src} has no FP8 weights; there is nothing to dequantize")
        orphans = [n for n in fp8 if n + "_scale_inv" not in infos]
        if orphans:
            raise ValueError(f"{orphans[0]} is float8_e4m3fn but its weight_scale_inv is missing")
    elif fp8:
        raise ValueError(f"{src} already holds FP8 weights (e.g. {fp8[0]}); cast it to bf16 first to requantize")

    # Plan every output file from the headers: (input name, what to write) in the input's header order.
    plans: dict[Path, list[tuple[str, list[TensorSpec]]]] = {f: [] for f in files}
    for name, info in infos.items():
        weight = infos.get(name.removesuffix("_scale_inv")) if name.endswith("_scale_inv") else None
        if to == "bf16" and info.dtype == "F8_E4M3":
            out = [TensorSpec(name, "BF16", info.shape)]
        elif to == "bf16" and weight is not None and weight.dtype == "F8_E4M3":
            out = []                                           # the scale of a weight being dequantized
        elif to == "fp8" and is_fp8_weight(name):
            if info.dtype not in _FLOAT or len(info.shape) != 2:
                raise ValueError(f"{name} should be a 2-D float weight to quantize, got {info.dtype} "
                                 f"{list(info.shape)}")
            n, k = info.shape
            out = [TensorSpec(name, "F8_E4M3", info.shape),
                   TensorSpec(name + "_scale_inv", "F32", (-(-n // block[0]), -(-k // block[1])))]
        else:
            out = [TensorSpec(name, info.dtype, info.shape)]
        plans[info.file].append((name, out))

    if to == "fp8":
        cfg = {**cfg, "quantization_config": quantization_config(scale_fmt)}
    else:
        cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    def convert(name, tensor, read, stream):
        if specs_of[name][0].dtype == "F8_E4M3":
            q, s = weight_quant_torch(tensor, block, scale_fmt)
            stream.write(name, q)
            stream.write(name + "_scale_inv", s)
        elif tensor.dtype == torch.float8_e4m3fn:
            stream.write(name, weight_dequant_torch(tensor, read(name + "_scale_inv"), block, torch.bfloat16))
        else:
            stream.write(name, tensor)

    specs_of = {name: specs for plan in plans.values() for name, specs in plan}
    return write_shard_by_shard(src, dst, force, plans, infos, cfg, f"Casting to {to}", progress, convert)
