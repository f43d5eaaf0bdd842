"""Building blocks shared by the DeepSeek models: RMSNorm, linear layers (model dtype or FP8 block-scaled),
the embedding and the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import weight_dequant_torch


# How FP8 weights are multiplied: "auto" picks by device; "torch" dequantizes in PyTorch (the reference path).
FP8_IMPLS = ("auto", "torch")


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
           block_size: tuple[int, int] = (128, 128), fp8_impl: str = "auto") -> torch.Tensor:
    """y = x W^T for a weight in x's dtype, or an FP8 e4m3 weight with its block scale."""
    if scale is None:
        return F.linear(x, weight)
    return F.linear(x, weight_dequant_torch(weight, scale, block_size, x.dtype))


def set_fp8_impl(model: nn.Module, impl: str) -> None:
    """Choose how every FP8 linear layer and expert stack of `model` computes (see FP8_IMPLS)."""
    if impl not in FP8_IMPLS:
        raise ValueError(f"unknown fp8_impl {impl!r}; choose one of {', '.join(FP8_IMPLS)}")
    for m in model.modules():
        if hasattr(m, "fp8_impl"):
            m.fp8_impl = impl


class Linear(nn.Module):
    """A bias-free linear layer. The loader may replace `weight` by an FP8 tensor and set `scale` beside it."""

    def __init__(self, in_features: int, out_features: int, block_size: tuple[int, int] = (128, 128)):
        super().__init__()
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        self.fp8_impl = "auto"
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.register_parameter("scale", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.scale, self.block_size, self.fp8_impl)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in `dtype` (a view when it is not quantized)."""
        if self.scale is None:
            return self.weight.to(dtype)
        return weight_dequant_torch(self.weight, self.scale, self.block_size, dtype)


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 (weight included) and rounded once."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return y.to(x.dtype)


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); the product is formed in float32. Dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int, block_size: tuple[int, int] = (128, 128)):
        super().__init__()
        self.w1 = Linear(dim, inter_dim, block_size)   # gate_proj
        self.w2 = Linear(inter_dim, dim, block_size)   # down_proj
        self.w3 = Linear(dim, inter_dim, block_size)   # up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2((F.silu(self.w1(x).float()) * self.w3(x).float()).to(x.dtype))
