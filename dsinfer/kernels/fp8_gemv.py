"""FP8 block-scaled matrix-vector products for one token (batch-1 decode), and their PyTorch twin.

At one row the FP8 GEMM's tensor-core tile multiplies 15 rows of padding and needs the activation quantized by a
launch of its own, and its K split one more launch to sum the partials; here a program holds a few weight rows,
walks the whole of K, quantizes the row itself as act_quant would (every program the same, from L2) and decodes
the e4m3 bytes with integer operations. Forms (y: (1, N)):
    y = act_quant(x) @ W^T                         quantize=True: the model's FP8 linear (fp8_gemm's numbers)
    y = x @ W^T                                    quantize=False: bf16 activations, the weight decoded exactly
    h = silu(min(x W1^T, L)) * clamp(x W3^T, -L, L)   w3 given: an MLP's gate/up with the SwiGLU (L = 0: no clamp)
    out += y                                       out given (float32): a down projection added into a sum
    y += sum_j slots[j]                            routed given: the routed experts' slots of the token (fused_moe)
groups > 1: a grouped projection, rows [g N/G, (g+1) N/G) of W read x[:, g K : (g+1) K] (V4's wo_a).
W: (N, K) float8_e4m3fn with (ceil(N/128), ceil(K/128)) float32 block scales. Products and sums in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp8 import SCALE_FMTS, act_dequant_torch, act_quant_torch, weight_dequant_torch
from .triton_common import check_device, check_tensor

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Up to this many weights (per matrix) the GEMV beats act_quant + the FP8 GEMM at one token; above it (DeepSeek-V3's
# wo and dense MLP on one GPU, 117M-132M) the tensor-core GEMM streams 4-12% faster (benchmarks/bench_fp8_gemv.py,
# BENCHMARKS.md, H200).
GEMV_MAX_WEIGHTS = 64 << 20


def gemv_fits(w: torch.Tensor) -> bool:
    """Whether a one-token product with the (N, K) FP8 weight w runs as the GEMV: K in 4-byte words, and not one
    of the largest matrices."""
    return w.shape[-1] % 4 == 0 and w.shape[-1] * w.shape[-2] <= GEMV_MAX_WEIGHTS


def fp8_gemv_torch(x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, w3: torch.Tensor | None = None,
                   w3_s: torch.Tensor | None = None, out: torch.Tensor | None = None, quantize: bool = True,
                   scale_fmt: str | None = None, groups: int = 1, swiglu_limit: float = 0.0,
                   dtype: torch.dtype = torch.bfloat16, routed: tuple | None = None) -> torch.Tensor:
    """x: (1, groups * K); w, w3: (N, K) e4m3 with block scales w_s, w3_s. Returns (1, N) in `dtype`, or `out`
    ((1, N) float32) with the product added. routed: (slots (k, N) float32, indices (k,) int64 global expert ids,
    first, n_local): slot j is added where its expert is local. Arguments as in the module docstring."""
    a = x.view(groups, -1)                                                            # (G, K)
    a = act_dequant_torch(*act_quant_torch(a, 128, scale_fmt)) if quantize else a.float()
    wf = weight_dequant_torch(w, w_s, dtype=torch.float32).view(groups, -1, a.shape[1])   # (G, N/G, K)
    y = torch.einsum("gk,gnk->gn", a, wf).reshape(1, -1)                              # (1, N) float32
    if w3 is not None:
        up = torch.einsum("gk,gnk->gn", a, weight_dequant_torch(w3, w3_s, dtype=torch.float32)
                          .view(groups, -1, a.shape[1])).reshape(1, -1)
        if swiglu_limit > 0:
            y, up = y.clamp(max=swiglu_limit), up.clamp(-swiglu_limit, swiglu_limit)
        y = F.silu(y) * up
    if routed is not None:
        slots, indices, first, n_local = routed
        local = (indices >= first) & (indices < first + n_local)
        y = y + torch.where(local[:, None], slots, 0.0).sum(dim=0, keepdim=True)
    if out is not None:
        return out.add_(y)
    return y.to(dtype)


def fp8_gemv(x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, w3: torch.Tensor | None = None,
             w3_s: torch.Tensor | None = None, out: torch.Tensor | None = None, quantize: bool = True,
             scale_fmt: str | None = None, groups: int = 1, swiglu_limit: float = 0.0,
             dtype: torch.dtype = torch.bfloat16, routed: tuple | None = None) -> torch.Tensor:
    """The Triton kernel; arguments and result as fp8_gemv_torch (x bfloat16; all contiguous; K a multiple of 4;
    with groups > 1, N / groups a multiple of 2)."""
    check_tensor("x", x, (torch.bfloat16,), 2)
    check_tensor("w", w, (torch.float8_e4m3fn,), 2)
    check_tensor("w_s", w_s, (torch.float32,), 2)
    check_device(x=x, w=w, w_s=w_s)
    (N, K), G = w.shape, groups
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"unknown scale_fmt {scale_fmt!r}; choose None or 'ue8m0'")
    if isinstance(G, bool) or not isinstance(G, int) or G < 1 or N % G or (G > 1 and (N // G) % 2):
        raise ValueError(f"groups must be a positive int dividing the {N} rows into even runs, got {groups!r}")
    if K == 0 or K % 4:
        raise ValueError(f"w must have a positive multiple of 4 columns (read as 32-bit words), got shape "
                         f"{tuple(w.shape)}")
    if w.data_ptr() % 4 or (w3 is not None and w3.data_ptr() % 4):
        raise ValueError("w and w3 must start at a 4-byte boundary (read as 32-bit words)")
    if x.data_ptr() % 8:
        x = x.clone()                                          # a view at an odd offset: read as 64-bit words
    blocks = (-(-N // 128), -(-K // 128))
    if x.shape != (1, G * K) or tuple(w_s.shape) != blocks:
        raise ValueError(f"shapes do not agree: x {tuple(x.shape)} needs (1, {G * K}) for w {tuple(w.shape)} in "
                         f"{G} groups; w_s {tuple(w_s.shape)} needs {blocks}")
    if w3 is not None:
        check_tensor("w3", w3, (torch.float8_e4m3fn,), 2)
        check_tensor("w3_s", w3_s, (torch.float32,), 2)
        check_device(x=x, w3=w3, w3_s=w3_s)
        if w3.shape != w.shape or w3_s.shape != w_s.shape or out is not None:
            raise ValueError(f"w3 {tuple(w3.shape)} and its scales {tuple(w3_s.shape)} must match w "
                             f"{tuple(w.shape)}, and a gated product takes no `out`")
    if out is not None:
        check_tensor("out", out, (torch.float32,), 2)
        check_device(x=x, out=out)
        if out.shape != (1, N):
            raise ValueError(f"out must be (1, {N}), got {tuple(out.shape)}")
    if swiglu_limit < 0:
        raise ValueError(f"swiglu_limit must be >= 0 (0: no clamp), got {swiglu_limit}")
    if routed is not None:
        slots, indices = routed[0], routed[1]
        check_tensor("routed slots", slots, (torch.float32,), 2)
        check_tensor("routed indices", indices, (torch.int64,), 1)
        check_device(x=x, slots=slots, indices=indices)
        if slots.shape != (indices.numel(), N) or w3 is not None:
            raise ValueError(f"routed slots {tuple(slots.shape)} need one row of {N} per index "
                             f"({indices.numel()}), and a gated product takes none")
    if dtype not in OUT_DTYPES:
        raise TypeError(f"dtype must be one of {', '.join(str(t).removeprefix('torch.') for t in OUT_DTYPES)}; "
                        f"got {dtype}")
    y = out if out is not None else torch.empty(1, N, dtype=dtype, device=x.device)
    if N:
        from .fp8_gemv_triton import launch
        launch(x, w, w_s, w3, w3_s, y, quantize, scale_fmt == "ue8m0", G, float(swiglu_limit), out is not None,
               routed)
    return y
