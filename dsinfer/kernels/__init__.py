"""Compute kernels behind a small seam. Each has a pure-PyTorch twin; kernels never import models/ or engine/."""

from .fp8 import FP8_MAX, check_block_scale, weight_dequant_torch, weight_quant_torch
from .mla_attention import mla_attention_torch, mla_naive_attention_torch

__all__ = ["FP8_MAX", "check_block_scale", "weight_dequant_torch", "weight_quant_torch", "mla_attention_torch",
           "mla_naive_attention_torch"]
