"""Building blocks shared by the DeepSeek models: RMSNorm, linear layers (model dtype or FP8 block-scaled),
the embedding and the SwiGLU MLP, with their tensor-parallel forms (column- and row-parallel linear layers, a
vocabulary-parallel embedding) driven by a `ParallelState`; with one process they are the plain layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import weight_dequant_torch
from ..kernels.fp8_gemv import fp8_gemv, gemv_fits
from ..kernels.norm_rope import rms_norm_torch
from ..kernels.triton_common import interpreting
from ..parallel import ParallelState

# How FP8 weights are multiplied:
#   "torch"       dequantize to x's dtype in PyTorch and call F.linear (the reference path; CPU default)
#   "fp8_gemm"    quantize x per token (act_quant, the model's scale_fmt) and run the Triton FP8 GEMM (Ada/Hopper+)
#   "weight_only" decode the e4m3 bytes inside a Triton bf16 GEMM (GPUs without FP8 tensor cores, e.g. A100)
#   (both: one token (M = 1) runs kernels/fp8_gemv.py's matrix-vector product instead, x quantized in it or not)
#   "auto"        torch on CPU; fp8_gemm on CUDA with compute capability >= 8.9; weight_only on older CUDA GPUs
FP8_IMPLS = ("auto", "torch", "fp8_gemm", "weight_only")
KERNEL_BLOCK = (128, 128)    # the only weight block size the Triton kernels take


def resolve_fp8_impl(impl: str, device: torch.device, block_size: tuple[int, int] = KERNEL_BLOCK) -> str:
    """The concrete path ("torch", "fp8_gemm" or "weight_only") that `impl` means for a weight on `device`."""
    if impl not in FP8_IMPLS:
        raise ValueError(f"unknown fp8_impl {impl!r}; choose one of {', '.join(FP8_IMPLS)}")
    if impl == "auto":
        if device.type != "cuda" or tuple(block_size) != KERNEL_BLOCK:
            return "torch"
        return "fp8_gemm" if torch.cuda.get_device_capability(device) >= (8, 9) else "weight_only"
    if impl != "torch":
        if device.type != "cuda" and not interpreting():
            raise ValueError(f"fp8_impl {impl!r} runs Triton kernels and needs a CUDA device (got {device}); use "
                             "'torch' or 'auto' on CPU")
        if tuple(block_size) != KERNEL_BLOCK:
            raise ValueError(f"fp8_impl {impl!r} supports 128x128 weight blocks only, got {tuple(block_size)}; "
                             "use 'torch'")
    return impl


def fused_moe_mode(scaled: bool, fp8_impl: str, device: torch.device,
                   block_size: tuple[int, int] = KERNEL_BLOCK) -> str:
    """The fused MoE kernel's mode for a stack of experts (or a dense MLP run as one): "plain" for unquantized
    weights; for FP8, "block_scaled" (activations quantized per token and 128 channels, FP8 tensor cores) where
    fp8_impl resolves to fp8_gemm, else "weight_only". Block-scaled at every batch size: on an H100 it reads the
    weights twice as fast as weight-only even at one token (weight-only decodes every byte with integer ops;
    benchmarks/sweep_small_m.py --moe), and one mode for all batch sizes keeps a token's result independent of
    how many tokens share its step."""
    if not scaled:
        return "plain"
    return "block_scaled" if resolve_fp8_impl(fp8_impl, device, block_size) == "fp8_gemm" else "weight_only"


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
           block_size: tuple[int, int] = (128, 128), fp8_impl: str = "auto",
           scale_fmt: str | None = None) -> torch.Tensor:
    """y = x W^T for a weight in x's dtype, or an FP8 e4m3 weight with its block scale.

    x: (..., K); weight: (N, K); scale: (ceil(N/128), ceil(K/128)) float32 or None -> (..., N) in x's dtype.
    `scale_fmt` ("ue8m0" or None) is how fp8_gemm quantizes x."""
    if scale is None:
        return F.linear(x, weight)
    impl = resolve_fp8_impl(fp8_impl, x.device, block_size)
    if impl == "torch":
        return F.linear(x, weight_dequant_torch(weight, scale, block_size, x.dtype))
    from .. import kernels  # the Triton kernels import triton on first use
    x2 = x.reshape(-1, x.shape[-1])                                            # (M, K)
    quantize = impl == "fp8_gemm"
    if x2.shape[0] == 1 and gemv_fits(weight) and (x2.dtype == torch.bfloat16 or not quantize):
        y = fp8_gemv(                                   # one token: a matrix-vector product
            x2.to(torch.bfloat16).contiguous(), weight, scale, quantize=quantize, scale_fmt=scale_fmt)
    elif quantize:
        q, s = kernels.act_quant(x2.contiguous(), 128, scale_fmt)
        y = kernels.fp8_gemm(q, s, weight, scale)
    else:
        y = kernels.fp8_weight_only_gemm(x2.to(torch.bfloat16).contiguous(), weight, scale)
    return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])                 # (..., N)


def stack_linears(*layers: "Linear") -> "Linear | None":
    """One Linear that computes `layers` (of one input) side by side, their outputs concatenated in order: one GEMM
    and one activation quantization instead of several. None where they cannot be stacked: different inputs,
    formats or dtypes, or FP8 blocks that would straddle a seam."""
    first = layers[0]
    if any(m.in_features != first.in_features or (m.scale is None) != (first.scale is None)
           or m.weight.dtype != first.weight.dtype or m.block_size != first.block_size for m in layers):
        return None
    if first.scale is not None and any(m.out_features % first.block_size[0] for m in layers[:-1]):
        return None
    fused = Linear(first.in_features, sum(m.out_features for m in layers), first.block_size)
    fused.weight = nn.Parameter(torch.cat([m.weight for m in layers]), requires_grad=False)
    if first.scale is not None:
        fused.scale = nn.Parameter(torch.cat([m.scale for m in layers]), requires_grad=False)
    fused.fp8_impl, fused.act_scale_fmt = first.fp8_impl, first.act_scale_fmt
    return fused


ATTN_BACKENDS = ("torch", "triton")


def set_attn_backend(model: nn.Module, backend: str) -> None:
    """Run the attention of `model` with the PyTorch twins or the Triton kernels: MLA's absorbed attention and
    cache write; DeepSeek-V4's sparse attention, compressor pooling, indexer scoring and hyper-connection mixing
    (every module with an `attn_backend` attribute)."""
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTN_BACKENDS)}")
    for m in model.modules():
        if hasattr(m, "attn_backend"):
            m.attn_backend = backend


def set_fp8_impl(model: nn.Module, impl: str, scale_fmt: str | None = None) -> None:
    """Choose how every FP8 linear layer and expert stack of `model` computes (see FP8_IMPLS).

    `scale_fmt` is the activation scale format for fp8_gemm; None takes the model's own
    (`model.args.quant.scale_fmt` where the model has one)."""
    if impl not in FP8_IMPLS:
        raise ValueError(f"unknown fp8_impl {impl!r}; choose one of {', '.join(FP8_IMPLS)}")
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"unknown scale_fmt {scale_fmt!r}; choose None or 'ue8m0'")
    if scale_fmt is None:
        scale_fmt = getattr(getattr(getattr(model, "args", None), "quant", None), "scale_fmt", None)
    for m in model.modules():
        if hasattr(m, "fp8_impl"):
            m.fp8_impl = impl
            m.act_scale_fmt = scale_fmt


class Linear(nn.Module):
    """A bias-free linear layer. The loader may replace `weight` by an FP8 tensor and set `scale` beside it."""

    def __init__(self, in_features: int, out_features: int, block_size: tuple[int, int] = (128, 128)):
        super().__init__()
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        self.fp8_impl = "auto"
        self.act_scale_fmt: str | None = None     # activation scale format for fp8_gemm (set by set_fp8_impl)
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.register_parameter("scale", None)
        self._dense: torch.Tensor | None = None      # an FP8 weight dequantized by `dense`, kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.scale, self.block_size, self.fp8_impl, self.act_scale_fmt)

    def grouped(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """A grouped projection (V4's wo_a): x (T, groups, in_features) -> (T, groups, N / groups), group g through
        weight rows g N/groups .. (g+1) N/groups - 1, in x's dtype from the dense weight (`dense`). An FP8 weight
        on the kernels' path at one token runs as one matrix-vector launch on the FP8 bytes (x not quantized)."""
        T = x.shape[0]
        if (T == 1 and self.scale is not None and gemv_fits(self.weight)
                and resolve_fp8_impl(self.fp8_impl, x.device, self.block_size) != "torch"):
            y = fp8_gemv(x.reshape(1, -1).to(torch.bfloat16).contiguous(), self.weight, self.scale, quantize=False,
                         groups=groups)
            return y.to(x.dtype).view(1, groups, -1)
        w = self.dense(x.dtype).view(groups, self.out_features // groups, -1)
        return torch.einsum("tgd,grd->tgr", x, w)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in `dtype` for layers that use it as a tensor rather than as a linear map (MLA's absorbed
        kv_b, V4's grouped wo_a). An FP8 weight is dequantized on first use and kept, as DeepSeek's own code
        converts these to bf16 once: they are small next to a layer's other weights."""
        if self.scale is None:
            return self.weight.to(dtype)
        if self._dense is None or self._dense.dtype != dtype:
            self._dense = self.dequantized(dtype)
        return self._dense

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in `dtype` (a view when it is not quantized)."""
        if self.scale is None:
            return self.weight.to(dtype)
        return weight_dequant_torch(self.weight, self.scale, self.block_size, dtype)


class ColumnParallelLinear(Linear):
    """Output features split across ranks: this rank holds rows [r*N/n, (r+1)*N/n) of the weight and computes
    those outputs. With `gather_output` the slices are gathered into the whole output (the LM head's logits)."""

    def __init__(self, in_features: int, out_features: int, parallel: ParallelState | None = None,
                 block_size: tuple[int, int] = (128, 128), gather_output: bool = False):
        parallel = parallel or ParallelState.single()
        super().__init__(in_features, parallel.split(out_features, "out_features"), block_size)
        self.parallel, self.gather_output = parallel, gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)                                                 # (..., N/n)
        return self.parallel.all_gather(y, -1) if self.gather_output else y


class RowParallelLinear(Linear):
    """Input features split across ranks: this rank holds columns [r*K/n, (r+1)*K/n) and multiplies its slice of
    x. The partial products are summed over the ranks, unless `reduce=False`: then the caller sums once after
    adding other partial sums (the MoE adds routed and shared experts first)."""

    def __init__(self, in_features: int, out_features: int, parallel: ParallelState | None = None,
                 block_size: tuple[int, int] = (128, 128), reduce: bool = True):
        parallel = parallel or ParallelState.single()
        super().__init__(parallel.split(in_features, "in_features"), out_features, block_size)
        self.parallel, self.reduce = parallel, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return self.parallel.all_reduce(y) if self.reduce else y


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 (weight included) and rounded once."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """The norm of x; with `residual`, of h = x + residual (rounded once), returning (norm, h): the add
        fused into the norm's launch on CUDA."""
        if residual is not None:
            if x.is_cuda and x.dim() == 2:
                from ..kernels.norm_rope_triton import add_rms_norm
                return add_rms_norm(x, residual, self.weight, self.eps)
            h = x + residual
            return self(h), h
        if x.is_cuda:                  # one fused launch instead of seven (its twin below)
            from ..kernels.norm_rope_triton import rms_norm
            return rms_norm(x, self.weight, self.eps)
        return rms_norm_torch(x, self.weight, self.eps)


class Embedding(nn.Module):
    """Token embedding. Under tensor parallelism each rank holds a contiguous 1/n of the vocabulary; ids outside
    it give zero rows, and the sum over the ranks is the embedding."""

    def __init__(self, vocab_size: int, dim: int, parallel: ParallelState | None = None):
        super().__init__()
        self.parallel = parallel or ParallelState.single()
        self.part = self.parallel.split(vocab_size, "vocab_size")
        self.start = self.parallel.rank * self.part
        self.weight = nn.Parameter(torch.empty(self.part, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.world_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.part)
        y = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return self.parallel.all_reduce(y)                                      # (T, D)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); the product is formed in float32. Dense layers and shared experts.
    Under tensor parallelism the width is split (w1, w3 by rows, w2 by columns); `reduce=False` leaves the
    sum over the ranks to the caller. backend "triton" (moe.set_moe_backend) runs it as the fused MoE kernels'
    two launches (gate and up with the SwiGLU, then down) instead of three GEMMs and the elementwise ops."""

    def __init__(self, dim: int, inter_dim: int, block_size: tuple[int, int] = (128, 128),
                 parallel: ParallelState | None = None, reduce: bool = True):
        super().__init__()
        self.backend = "torch"
        self.w1 = ColumnParallelLinear(dim, inter_dim, parallel, block_size)            # gate_proj
        self.w2 = RowParallelLinear(inter_dim, dim, parallel, block_size, reduce)       # down_proj
        self.w3 = ColumnParallelLinear(dim, inter_dim, parallel, block_size)            # up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":
            y = self.fused(x, out_dtype=x.dtype)
            return self.w2.parallel.all_reduce(y) if self.w2.reduce else y
        return self.w2((F.silu(self.w1(x).float()) * self.w3(x).float()).to(x.dtype))

    def fused(self, x: torch.Tensor, out: torch.Tensor | None = None,
              out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """x: (T, D) -> this rank's (T, D) output through the fused kernels (in out_dtype), added into `out` if
        given."""
        return fused_swiglu(self.w1, self.w2, self.w3, x, out, out_dtype=out_dtype)

    def fused_up(self, x: torch.Tensor):
        """The fused kernels' first launch (gate/up and the SwiGLU) -> kernels.fused_moe.MlpHidden."""
        from ..kernels.fused_moe import fused_mlp_up
        w1, w2, w3 = self.w1, self.w2, self.w3
        return fused_mlp_up(x, w1.weight, w2.weight, w3.weight, w1.scale, w2.scale, w3.scale,
                            fused_moe_mode(w1.scale is not None, w1.fp8_impl, x.device, w1.block_size),
                            scale_fmt=w1.act_scale_fmt)

    def fused_down(self, hidden, routed=None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The second launch on `fused_up`'s output -> (T, D) in out_dtype, plus the `routed` slots
        (kernels.fused_moe.RoutedSlots) of these tokens, summed in slot order, if given."""
        from ..kernels.fused_moe import fused_mlp_down
        return fused_mlp_down(hidden, self.w2.weight, self.w2.scale, routed=routed, out_dtype=out_dtype)


def fused_swiglu(w1: Linear, w2: Linear, w3: Linear, x: torch.Tensor, out: torch.Tensor | None = None,
                 swiglu_limit: float = 0.0, out_dtype: torch.dtype = torch.float32, routed=None) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x) of three linear layers (bf16 or FP8) through the fused MoE kernels' two launches,
    every token on one "expert": (T, D) in out_dtype, added into `out` if given, plus the `routed` slots
    (kernels.fused_moe.RoutedSlots) of these tokens if given. swiglu_limit: V4's clamp."""
    from ..kernels.fused_moe import fused_mlp
    mode = fused_moe_mode(w1.scale is not None, w1.fp8_impl, x.device, w1.block_size)
    return fused_mlp(x, w1.weight, w2.weight, w3.weight, w1.scale, w2.scale, w3.scale, mode, out=out,
                     swiglu_limit=swiglu_limit, routed=routed, out_dtype=out_dtype, scale_fmt=w1.act_scale_fmt)
