"""DeepSeek-V4 mixture of experts (spec section 2.10): every layer is MoE with one shared expert.

- Router: scores sqrt(softplus(x W^T)) in float32. Learned layers pick the top-k of scores + a float32
  correction bias (selection only); hash layers take the experts from a fixed table, tid2eid[token id]. The
  chosen scores are renormalised to sum to 1 and multiplied by route_scale.
- Experts: SwiGLU with a clamp, gate = min(x W1, L), up = clamp(x W3, -L, L), h = silu(gate) * up in float32;
  the routing weight multiplies h before W2 (as the reference). The shared expert is clamped the same way.
- Routed expert weights are stacked per layer and stay in the checkpoint's format: bf16/fp32, FP8 e4m3 with
  128x128 block scales, or FP4 e2m1 packed two per byte with one E8M0 scale per 32 inputs.
- Two backends (`Experts.backend`, set by `moe.set_moe_backend`): "torch" dequantizes one expert at a time (a
  loop that waits for the host once per layer); "triton" runs the routed experts in the fused MoE kernel
  (FP4 decoded in registers, the clamp and the routing weight on h inside) and the shared expert in the same
  kernels' dense form, whose down projection adds the routed slots and stores the layer's output, without a
  host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import weight_dequant_torch
from ..kernels.fp4 import fp4_dequant_torch
from ..kernels.moe_gate_triton import hash_route_torch, route_torch
from .args_v4 import ModelArgsV4
from .layers import Linear, fused_moe_mode, fused_swiglu


def swiglu_clamped(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(gate, limit)) * clamp(up, -limit, limit) in float32 (limit 0: no clamp)."""
    gate, up = gate.float(), up.float()
    if limit > 0:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return F.silu(gate) * up


class Gate(nn.Module):
    """Router. Returns weights (T, k) float32 and expert indices (T, k) int64."""

    def __init__(self, layer_id: int, args: ModelArgsV4):
        super().__init__()
        self.topk, self.route_scale = args.n_activated_experts, args.route_scale
        self.hash = args.hash_layers[layer_id]
        # float32, as the reference computes the scores (kept so, not cast at every call)
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim, dtype=torch.float32),
                                   requires_grad=False)
        if self.hash:
            self.tid2eid = nn.Parameter(torch.zeros(args.vocab_size, self.topk, dtype=torch.int64),
                                        requires_grad=False)
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(torch.zeros(args.n_routed_experts, dtype=torch.float32), requires_grad=False)
            self.register_parameter("tid2eid", None)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.is_cuda:       # the logits as one GEMV launch at decode, one launch for the routing after them
            from ..kernels.moe_gate_triton import hash_route, route, router_logits
            logits = router_logits(x, self.weight)                                     # (T, E) float32
        else:
            logits, route, hash_route = F.linear(x.float(), self.weight), route_torch, hash_route_torch
        if not self.hash:   # sqrt(softplus) scores; top-k of scores + bias; the chosen scores renormalised, scaled
            return route(logits, self.bias, 1, 1, self.topk, "sqrtsoftplus", True, self.route_scale)
        return hash_route(logits, token_ids, self.tid2eid, self.route_scale)          # by token id, renormalised


class Experts(nn.Module):
    """Routed experts, stacked: w1/w3 (E, I, D), w2 (E, D, I) when dense. The loader replaces them by FP8
    stacks with `w*_scale` (E, blocks, blocks) float32, or FP4 stacks (E, N, K/2) uint8 with `w*_scale`
    (E, N, K/32) E8M0 bytes (uint8)."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, block_size: tuple[int, int] = (128, 128)):
        super().__init__()
        self.n_experts, self.block_size = n_experts, block_size
        self.backend = "torch"            # or "triton" (the fused kernel); see moe.set_moe_backend
        self.fp8_impl = "auto"            # FP8 stacks only; see layers.set_fp8_impl
        self.act_scale_fmt: str | None = None     # activation scale format of FP8 stacks (set_fp8_impl)
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim), requires_grad=False)   # gate
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim), requires_grad=False)   # down
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim), requires_grad=False)   # up
        for name in ("w1_scale", "w2_scale", "w3_scale"):
            self.register_parameter(name, None)

    @property
    def fmt(self) -> str:
        """"fp4", "fp8" or "dense": how the stacks are stored."""
        if self.w1.dtype == torch.uint8:
            return "fp4"
        return "fp8" if self.w1.dtype == torch.float8_e4m3fn else "dense"

    def fused_mode(self, device: torch.device) -> str:
        """The fused kernel's mode for these stacks."""
        if self.fmt == "fp4":
            return "fp4_weight_only"
        return fused_moe_mode(self.fmt == "fp8", self.fp8_impl, device, self.block_size)

    def weight(self, name: str, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert e's weight `name` ("w1", "w2", "w3") dequantized to `dtype`."""
        w, s = getattr(self, name)[e], getattr(self, f"{name}_scale")
        if s is None:
            return w.to(dtype)
        if w.dtype == torch.uint8:
            return fp4_dequant_torch(w, s[e], dtype)
        return weight_dequant_torch(w, s[e], self.block_size, dtype)

    def expert_forward(self, e: int, x: torch.Tensor, weight: torch.Tensor, limit: float) -> torch.Tensor:
        """Expert e on x (n, D), routing weights (n,) float32 -> (n, D) float32."""
        h = swiglu_clamped(F.linear(x, self.weight("w1", e, x.dtype)), F.linear(x, self.weight("w3", e, x.dtype)),
                           limit)
        return F.linear((h * weight[:, None]).to(x.dtype), self.weight("w2", e, x.dtype)).float()


class SharedExpert(nn.Module):
    """The always-on expert: a clamped SwiGLU MLP of width moe_inter_dim (FP8 linears in the checkpoint)."""

    def __init__(self, dim: int, inter_dim: int, limit: float, block_size: tuple[int, int] = (128, 128)):
        super().__init__()
        self.limit = limit
        self.w1 = Linear(dim, inter_dim, block_size)
        self.w2 = Linear(inter_dim, dim, block_size)
        self.w3 = Linear(dim, inter_dim, block_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu_clamped(self.w1(x), self.w3(x), self.limit).to(x.dtype))

    def fused(self, x: torch.Tensor, routed) -> torch.Tensor:
        """x: (T, D) -> the expert's output plus the routed experts' slots (kernels.fused_moe.RoutedSlots), summed
        in float32 in the fused kernels' epilogue and stored in x's dtype."""
        return fused_swiglu(self.w1, self.w2, self.w3, x, swiglu_limit=self.limit, out_dtype=x.dtype, routed=routed)


class MoE(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgsV4):
        super().__init__()
        block = args.quant.block_size if args.quant else (128, 128)
        self.limit = args.swiglu_limit
        self.gate = Gate(layer_id, args)
        self.experts = Experts(args.n_routed_experts, args.dim, args.moe_inter_dim, block)
        self.shared_experts = SharedExpert(args.dim, args.moe_inter_dim, args.swiglu_limit, block)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """x: (T, D), token_ids: (T,) -> (T, D). Routed outputs summed in float32, then the shared expert."""
        weights, indices = self.gate(x, token_ids)                                     # (T, k), (T, k)
        if self.experts.backend == "triton":    # routed slots, then the shared expert adds them as it stores
            from ..kernels.fused_moe import fused_moe_slots
            e = self.experts
            routed = fused_moe_slots(x, weights, indices, e.w1, e.w2, e.w3, e.w1_scale, e.w2_scale, e.w3_scale,
                                     mode=e.fused_mode(x.device), swiglu_limit=self.limit, route_on_h=True,
                                     scale_fmt=e.act_scale_fmt)
            return self.shared_experts.fused(x, routed)
        flat = indices.flatten()
        order = flat.argsort(stable=True)                                              # slots grouped by expert
        token, weight = order // indices.shape[1], weights.flatten()[order]
        counts = torch.bincount(flat, minlength=self.experts.n_experts).tolist()
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        start = 0
        for e, count in enumerate(counts):
            if count:
                rows = token[start:start + count]
                y.index_add_(0, rows, self.experts.expert_forward(e, x[rows], weight[start:start + count],
                                                                  self.limit))
                start += count
        return (y + self.shared_experts(x).float()).to(x.dtype)

