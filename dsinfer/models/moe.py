"""Mixture of experts (DeepSeek V2/V3): a router with every released gate variant, routed experts stored
stacked per layer, and the shared experts as one wide MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .layers import MLP, linear


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
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim), requires_grad=False)
        if args.has_gate_bias:
            self.bias = nn.Parameter(torch.zeros(args.n_routed_experts, dtype=torch.float32), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())                       # (T, E)
        scores = logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()
        choice = scores if self.bias is None else scores + self.bias
        if self.n_groups > 1:
            grouped = choice.view(x.shape[0], self.n_groups, -1)                  # (T, G, E/G)
            if self.bias is None:
                group_scores = grouped.amax(dim=-1)
            else:
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            kept = group_scores.topk(self.topk_groups, dim=-1).indices            # (T, topk_groups)
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, kept, False)
            choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        indices = choice.topk(self.topk, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, indices


class Experts(nn.Module):
    """The routed experts of one layer, stacked: w1/w3 (E, I, D), w2 (E, D, I); FP8 scales `w*_scale` if quantized."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, block_size: tuple[int, int] = (128, 128)):
        super().__init__()
        self.n_experts, self.block_size = n_experts, block_size
        self.fp8_impl = "auto"
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim), requires_grad=False)   # gate_proj
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim), requires_grad=False)   # down_proj
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim), requires_grad=False)   # up_proj
        for name in ("w1_scale", "w2_scale", "w3_scale"):
            self.register_parameter(name, None)

    def _linear(self, x: torch.Tensor, name: str, e: int) -> torch.Tensor:
        scale = getattr(self, f"{name}_scale")
        return linear(x, getattr(self, name)[e], None if scale is None else scale[e], self.block_size, self.fp8_impl,
                      getattr(self, "act_scale_fmt", None))

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU of expert e on x (n, D) -> (n, D)."""
        h = F.silu(self._linear(x, "w1", e).float()) * self._linear(x, "w3", e).float()
        return self._linear(h.to(x.dtype), "w2", e)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        block = args.quant.block_size if args.quant else (128, 128)
        self.gate = Gate(args)
        self.experts = Experts(args.n_routed_experts, args.dim, args.moe_inter_dim, block)
        self.shared_experts = MLP(args.dim, args.n_shared_experts * args.moe_inter_dim, block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, D) -> (T, D). Routed outputs are weighted and summed in float32, then the shared MLP is added.
        Token slots are sorted by expert once, so the host waits for the GPU once per layer (the expert counts),
        not once per expert."""
        weights, indices = self.gate(x)                                       # (T, k), (T, k)
        flat = indices.flatten()
        order = flat.argsort(stable=True)                                     # slots grouped by expert
        token, weight = order // indices.shape[1], weights.flatten()[order]
        counts = torch.bincount(flat, minlength=self.experts.n_experts).tolist()
        y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            rows = token[start:start + count]
            out = self.experts.expert_forward(e, x[rows]).float() * weight[start:start + count, None]
            y.index_add_(0, rows, out)
            start += count
        return (y + self.shared_experts(x).float()).to(x.dtype)
