"""Compute kernels behind a small seam. Each has a pure-PyTorch twin; kernels never import models/ or engine/.

The Triton kernels (act_quant, weight_dequant, fp8_gemm, fp8_weight_only_gemm) are imported on first use, so
`import dsinfer` works without Triton."""

from importlib import import_module

from .fp8 import (
    FP8_MAX,
    act_quant_torch,
    check_block_scale,
    fp8_gemm_torch,
    fp8_weight_only_gemm_torch,
    weight_dequant_torch,
    weight_quant_torch,
)
from .mla_attention import mla_attention_torch, mla_naive_attention_torch

# public name -> the module that defines it (imported lazily: it imports triton)
_TRITON = {"act_quant": "fp8_quant_triton", "weight_dequant": "fp8_quant_triton", "fp8_gemm": "fp8_gemm_triton",
           "fp8_weight_only_gemm": "fp8_weight_only_triton"}


def __getattr__(name: str):
    if name in _TRITON:
        return getattr(import_module(f".{_TRITON[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FP8_MAX", "check_block_scale", "weight_dequant_torch", "weight_quant_torch", "act_quant_torch",
           "fp8_gemm_torch", "fp8_weight_only_gemm_torch", "mla_attention_torch", "mla_naive_attention_torch",
           *_TRITON]
