"""Mixture of experts (DeepSeek V2/V3): a router with every released gate variant, routed experts stored
stacked per layer, and the shared experts as one wide MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.moe_gate_triton import route_torch
from ..parallel import ParallelState
from .args import ModelArgs
from .layers import MLP, fused_moe_mode, linear


class Gate(nn.Module):
    """Router. Returns top-k weights (T, k) float32 and expert indices (T, k) int64.

    - softmax + greedy (V2-Lite): top-k of softmax(z).
    - softmax + group_limited_greedy (V2): groups ranked by their best score, the best topk_group kept.
    - sigmoid + noaux_tc (V3): groups ranked by the sum of their top-2 biased scores; the fp32 correction bias
      changes which experts are chosen, never their weights.
    Excluded groups are masked with -inf (biased scores can be negative). Logits are computed in float32.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.topk = args.n_activated_experts
        self.n_groups, self.topk_groups = args.n_expert_groups, args.n_limited_groups
        self.score_func, self.norm_topk_prob, self.route_scale = args.score_func, args.norm_topk_prob, args.route_scale
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim, dtype=torch.float32),
                                   requires_grad=False)
        if args.has_gate_bias:
            self.bias = nn.Parameter(torch.zeros(args.n_routed_experts, dtype=torch.float32), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.is_cuda:               # the logits as one GEMV launch at decode, one launch for everything after them
            from ..kernels.moe_gate_triton import route, router_logits
            logits = router_logits(x, self.weight)                             # (T, E) float32
        else:
            logits, route = F.linear(x.float(), self.weight), route_torch
        return route(logits, self.bias, self.n_groups, self.topk_groups, self.topk, self.score_func,
                     self.norm_topk_prob, self.route_scale)


MOE_BACKENDS = ("torch", "triton")    # who runs the routed experts: a loop over experts, or the fused kernel


def set_moe_backend(model: nn.Module, backend: str) -> None:
    """Run the routed experts of every MoE layer of `model` (DeepSeek V2/V3 or V4) with the per-expert loop or the
    fused Triton kernel, and the dense MLPs (dense layers, shared experts) as three GEMMs or the fused kernels."""
    if backend not in MOE_BACKENDS:
        raise ValueError(f"unknown MoE backend {backend!r}; choose one of {', '.join(MOE_BACKENDS)}")
    from .v4_moe import Experts as ExpertsV4
    for m in model.modules():
        if isinstance(m, (Experts, ExpertsV4, MLP)):
            m.backend = backend


class Experts(nn.Module):
    """Routed experts [first, first + n_local) of one layer (all of them without expert parallelism), stacked:
    w1/w3 (n_local, I, D), w2 (n_local, D, I); FP8 scales `w*_scale` if quantized."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, block_size: tuple[int, int] = (128, 128),
                 first: int = 0, n_local: int | None = None):
        super().__init__()
        self.n_experts, self.block_size = n_experts, block_size
        self.first, self.n_local = first, n_experts if n_local is None else n_local
        self.fp8_impl = "auto"
        self.act_scale_fmt: str | None = None     # activation scale format of FP8 experts (set by set_fp8_impl)
        self.backend = "torch"
        self.w1 = nn.Parameter(torch.empty(self.n_local, inter_dim, dim), requires_grad=False)   # gate_proj
        self.w2 = nn.Parameter(torch.empty(self.n_local, dim, inter_dim), requires_grad=False)   # down_proj
        self.w3 = nn.Parameter(torch.empty(self.n_local, inter_dim, dim), requires_grad=False)   # up_proj
        for name in ("w1_scale", "w2_scale", "w3_scale"):
            self.register_parameter(name, None)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x: (T, D); weights, indices: (T, k) from the Gate -> (T, D) float32, the weighted sum of this rank's
        experts' outputs (slots routed to other ranks' experts add nothing)."""
        if self.backend == "triton":
            from ..kernels.fused_moe import fused_moe
            return fused_moe(x, weights, indices, self.w1, self.w2, self.w3, self.w1_scale, self.w2_scale,
                             self.w3_scale, self.first, self._mode(x), scale_fmt=self.act_scale_fmt)
        return self._loop(x, weights, indices)

    def slot_outputs(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor):
        """The fused kernel's weighted outputs per slot, not yet summed (kernels.fused_moe.RoutedSlots)."""
        from ..kernels.fused_moe import fused_moe_slots
        return fused_moe_slots(x, weights, indices, self.w1, self.w2, self.w3, self.w1_scale, self.w2_scale,
                               self.w3_scale, self.first, self._mode(x),
                               scale_fmt=self.act_scale_fmt)

    def _mode(self, x: torch.Tensor) -> str:
        return fused_moe_mode(self.w1_scale is not None, self.fp8_impl, x.device, self.block_size)

    def _loop(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The per-expert loop (CPU, and the fused kernel's oracle): slots sorted by expert once, so the host waits
        for the device once per layer (the expert counts), not once per expert."""
        flat = indices.flatten() - self.first
        flat = torch.where((flat >= 0) & (flat < self.n_local), flat, self.n_local)
        order = flat.argsort(stable=True)                                     # slots grouped by expert
        token, weight = order // indices.shape[1], weights.flatten()[order]
        counts = torch.bincount(flat, minlength=self.n_local + 1).tolist()
        y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        start = 0
        for e, count in enumerate(counts[:self.n_local]):
            if count:
                rows = token[start:start + count]
                out = self.expert_forward(e, x[rows]).float() * weight[start:start + count, None]
                y.index_add_(0, rows, out)
            start += count
        return y

    def _linear(self, x: torch.Tensor, name: str, e: int) -> torch.Tensor:
        scale = getattr(self, f"{name}_scale")
        return linear(x, getattr(self, name)[e], None if scale is None else scale[e], self.block_size, self.fp8_impl,
                      self.act_scale_fmt)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU of local expert e on x (n, D) -> (n, D)."""
        h = F.silu(self._linear(x, "w1", e).float()) * self._linear(x, "w3", e).float()
        return self._linear(h.to(x.dtype), "w2", e)


class MoE(nn.Module):
    """Under parallelism the router runs whole on every rank, each rank holds E/n routed experts and 1/n of the
    shared experts' width, and one all-reduce sums routed and shared partial outputs."""

    def __init__(self, args: ModelArgs, parallel: ParallelState | None = None):
        super().__init__()
        self.parallel = parallel or ParallelState.single()
        block = args.quant.block_size if args.quant else (128, 128)
        self.gate = Gate(args)
        n_local = self.parallel.split(args.n_routed_experts, "n_routed_experts")
        self.experts = Experts(args.n_routed_experts, args.dim, args.moe_inter_dim, block,
                               first=self.parallel.rank * n_local, n_local=n_local)
        self.shared_experts = MLP(args.dim, args.n_shared_experts * args.moe_inter_dim, block, self.parallel,
                                  reduce=False)
        self._side_stream: torch.cuda.Stream | None = None     # made on the first CUDA forward (see _fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, D) -> (T, D). Routed outputs are weighted and summed in float32, then the shared MLP is added."""
        if self.experts.backend == "triton" and self.shared_experts.backend == "triton":
            return self.parallel.all_reduce(self._fused(x))
        weights, indices = self.gate(x)                                       # (T, k), (T, k)
        y = self.experts(x, weights, indices)
        if self.shared_experts.backend == "triton":      # the shared MLP adds itself into y in its last kernel
            y = self.shared_experts.fused(x, y)
        else:
            y = y + self.shared_experts(x).float()
        return self.parallel.all_reduce(y.to(x.dtype))

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        """Everything in the fused kernels, in x's dtype. The shared MLP's gate/up GEMM runs on a side stream
        (on CUDA) beside the router and the routed experts, whose small launches leave most of the GPU idle; its
        down GEMM then sums each token's routed slots (in slot order), adds its own output and stores the sum
        in x's dtype: no separate sum, zero fill or cast. Every side-stream launch first waits for the main
        stream, so memory the side stream frees is reused only after the main stream's use of it."""
        side = None
        if x.is_cuda:
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(x.device)
            side, main = self._side_stream, torch.cuda.current_stream(x.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                hidden = self.shared_experts.fused_up(x)
        else:
            hidden = self.shared_experts.fused_up(x)
        weights, indices = self.gate(x)                                       # (T, k), (T, k)
        routed = self.experts.slot_outputs(x, weights, indices)
        if side is not None:
            main.wait_stream(side)
        return self.shared_experts.fused_down(hidden, routed=routed, out_dtype=x.dtype)
