"""The MoE router on the GPU: its float32 logits (`router_logits`), then routing in one launch per batch: scores
(softmax, sigmoid or V4's sqrt(softplus)), the correction bias, group-limited selection, top-k, renormalisation
and the route scale.

PyTorch spends a dozen launches on routing (softmax, two top-k passes, gathers, masks); the kernel takes one
token per program and finds the top-k by repeated arg-max, so ties go to the lower expert id, as `torch.topk`
does on these inputs in practice (exact ties do not occur with real logits). Twin: `route_torch`.
V4's hash layers take their experts from a table by token id: `hash_route` (twin `hash_route_torch`) weighs them in
one launch. The logits at decode sizes are one GEMV launch reading the activations in their dtype and the float32 weight
(cuBLAS takes a cast of x and two kernels); twin: `router_logits_torch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import check_device

SCORE_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")    # V2, V3, V4 routers
ROUTER_GEMV_BYTES = 16 << 20    # the GEMV re-reads the weight per token (from L2): up to this much, else cuBLAS


def router_logits_torch(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: (T, D) any float dtype; weight: (E, D) float32 -> (T, E) float32 logits x @ weight^T in float32."""
    return torch.nn.functional.linear(x.float(), weight)


@triton.jit
def _router_logits_kernel(x_ptr, w_ptr, out_ptr, E, D, stride_x, stride_w, stride_o,
                          BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """One token, BLOCK_E experts: float32 products accumulated per lane over D, then summed (an order fixed by
    the constexprs, so a token's logits do not depend on the batch)."""
    t = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_E, BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = d0 + d < D
        xv = tl.load(x_ptr + t * stride_x + d0 + d, mask=d_ok, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + e[:, None] * stride_w + d0 + d[None, :], mask=(e < E)[:, None] & d_ok[None, :],
                     other=0.0)
        acc += wv * xv[None, :]
    tl.store(out_ptr + t * stride_o + e, tl.sum(acc, 1), mask=e < E)


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: (T, D) bf16/fp16/fp32, last dim contiguous; weight: (E, D) float32 contiguous -> (T, E) float32. Decode
    sizes (T * E * D * 4 <= ROUTER_GEMV_BYTES) run one GEMV launch with x read in its dtype; larger batches cuBLAS
    on x.float()."""
    check_device(x=x, weight=weight)
    T, D = x.shape
    E = weight.shape[0]
    if weight.shape != (E, D) or weight.dtype != torch.float32 or not weight.is_contiguous():
        raise ValueError(f"router weight must be a contiguous float32 ({E}, {D}) tensor for x {tuple(x.shape)}, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    if T * weight.numel() * 4 > ROUTER_GEMV_BYTES:
        return router_logits_torch(x, weight)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(T, E, dtype=torch.float32, device=x.device)
    if T:
        block_d = min(2048, triton.next_power_of_2(D))
        _router_logits_kernel[(T, triton.cdiv(E, 2))](x, weight, out, E, D, x.stride(0), weight.stride(0),
                                                     out.stride(0), BLOCK_E=2, BLOCK_D=block_d, num_warps=4)
    return out


def _check_score_func(score_func: str) -> None:
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"unknown score_func {score_func!r}; choose one of {', '.join(SCORE_FUNCS)}")


def route_torch(logits: torch.Tensor, bias: torch.Tensor | None, n_groups: int, topk_groups: int, topk: int,
                score_func: str, norm_topk_prob: bool, route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: (T, E) float32 -> weights (T, k) float32, indices (T, k) int64 (see models.moe.Gate)."""
    _check_score_func(score_func)
    if score_func == "softmax":
        scores = logits.softmax(dim=-1)
    elif score_func == "sigmoid":
        scores = logits.sigmoid()
    else:                                                                      # V4: sqrt(softplus)
        scores = torch.nn.functional.softplus(logits).sqrt()
    choice = scores if bias is None else scores + bias
    if n_groups > 1:
        grouped = choice.view(logits.shape[0], n_groups, -1)                   # (T, G, E/G)
        if bias is None:
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        kept = group_scores.topk(topk_groups, dim=-1).indices                  # (T, topk_groups)
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, kept, False)
        choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
    indices = choice.topk(topk, dim=-1).indices
    weights = scores.gather(1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * route_scale, indices


@triton.jit
def _sqrt_softplus(z):
    """V4's router score sqrt(softplus(z)), torch's threshold 20; log1p(u) as log(v) u / (v - 1), v = 1 + u."""
    u = tl.exp(tl.minimum(z, 20.0))
    v = 1.0 + u
    return tl.sqrt(tl.where(z > 20.0, z, tl.where(v == 1.0, u, tl.log(v) * u / (v - 1.0))))


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, weights_ptr, indices_ptr, n_groups, per_group, stride_l, route_scale,
                  TOPK: tl.constexpr, G: tl.constexpr, TOPK_G: tl.constexpr, PER_G: tl.constexpr,
                  SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, G)
    j = tl.arange(0, PER_G)
    e = g[:, None] * per_group + j[None, :]                                    # (G, E/G) expert ids, padded
    ok = (g[:, None] < n_groups) & (j[None, :] < per_group)
    z = tl.load(logits_ptr + t * stride_l + e, mask=ok, other=float("-inf"))
    if SCORE == 1:
        scores = tl.sigmoid(z)
    elif SCORE == 2:
        scores = _sqrt_softplus(z)
    else:
        z = z - tl.max(tl.max(z, 1), 0)
        p = tl.exp(z)
        scores = p / tl.sum(tl.sum(p, 1), 0)
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + e, mask=ok, other=0.0)
    choice = tl.where(ok, choice, float("-inf"))
    if G > 1:
        best = tl.max(choice, 1)                                               # (G,)
        if HAS_BIAS:                                                           # sum of each group's top two
            first = tl.argmax(choice, 1)
            second = tl.max(tl.where(j[None, :] == first[:, None], float("-inf"), choice), 1)
            best = best + second
        kept = tl.zeros([G], tl.int1)
        for _ in tl.static_range(TOPK_G):
            pick = tl.argmax(tl.where(kept, float("-inf"), best), 0)
            kept = kept | (g == pick)
        choice = tl.where(kept[:, None], choice, float("-inf"))
    slots = tl.arange(0, BLOCK_K)
    out_w = tl.zeros([BLOCK_K], tl.float32)
    out_i = tl.zeros([BLOCK_K], tl.int64)
    flat_choice = tl.reshape(choice, [G * PER_G])
    flat_scores = tl.reshape(scores, [G * PER_G])
    flat_e = tl.reshape(e, [G * PER_G])
    ids = tl.arange(0, G * PER_G)
    for i in tl.static_range(TOPK):
        pick = tl.argmax(flat_choice, 0)
        w = tl.sum(tl.where(ids == pick, flat_scores, 0.0), 0)
        expert = tl.sum(tl.where(ids == pick, flat_e, 0), 0)
        out_w = tl.where(slots == i, w, out_w)
        out_i = tl.where(slots == i, expert.to(tl.int64), out_i)
        flat_choice = tl.where(ids == pick, float("-inf"), flat_choice)
    if NORM:
        out_w = out_w / (tl.sum(out_w, 0) + 1e-20)
    tl.store(weights_ptr + t * TOPK + slots, out_w * route_scale, mask=slots < TOPK)
    tl.store(indices_ptr + t * TOPK + slots, out_i, mask=slots < TOPK)


def route(logits: torch.Tensor, bias: torch.Tensor | None, n_groups: int, topk_groups: int, topk: int,
          score_func: str, norm_topk_prob: bool, route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: (T, E) float32 (last dim contiguous); bias: (E,) float32 or None -> weights (T, k) float32,
    indices (T, k) int64. E must divide into n_groups equal groups."""
    check_device(logits=logits)
    _check_score_func(score_func)
    T, E = logits.shape
    if E % n_groups or logits.stride(-1) != 1:
        raise ValueError(f"logits {tuple(logits.shape)} must have a contiguous last dim divisible by {n_groups} groups")
    weights = torch.empty(T, topk, dtype=torch.float32, device=logits.device)
    indices = torch.empty(T, topk, dtype=torch.int64, device=logits.device)
    if T:
        per_group = E // n_groups
        _route_kernel[(T,)](logits, bias if bias is not None else logits, weights, indices, n_groups, per_group,
                            logits.stride(0),
                            float(route_scale), TOPK=topk, G=triton.next_power_of_2(n_groups), TOPK_G=topk_groups,
                            PER_G=triton.next_power_of_2(per_group), SCORE=SCORE_FUNCS.index(score_func),
                            HAS_BIAS=bias is not None, NORM=norm_topk_prob, BLOCK_K=triton.next_power_of_2(topk),
                            num_warps=4)
    return weights, indices


def hash_route_torch(logits: torch.Tensor, token_ids: torch.Tensor, tid2eid: torch.Tensor,
                     route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """V4's hash layers: the experts of each token from a fixed table, weighted by their sqrt(softplus) scores
    renormalised to sum to 1, times route_scale. logits (T, E) float32, token_ids (T,) int64, tid2eid (V, k) ->
    weights (T, k) float32, indices (T, k) int64."""
    indices = tid2eid[token_ids].long()
    weights = torch.nn.functional.softplus(logits).sqrt().gather(1, indices)
    return weights / weights.sum(dim=-1, keepdim=True) * route_scale, indices


@triton.jit
def _hash_route_kernel(logits_ptr, ids_ptr, table_ptr, weights_ptr, indices_ptr, stride_l, stride_t, route_scale,
                       TOPK: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, BLOCK_K)
    ok = slots < TOPK
    e = tl.load(table_ptr + tl.load(ids_ptr + t) * stride_t + slots, mask=ok, other=0).to(tl.int64)
    w = tl.where(ok, _sqrt_softplus(tl.load(logits_ptr + t * stride_l + e, mask=ok, other=0.0)), 0.0)
    tl.store(weights_ptr + t * TOPK + slots, w / tl.sum(w, 0) * route_scale, mask=ok)
    tl.store(indices_ptr + t * TOPK + slots, e, mask=ok)


def hash_route(logits: torch.Tensor, token_ids: torch.Tensor, tid2eid: torch.Tensor,
               route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel (one launch, one token per program); arguments and results as hash_route_torch."""
    check_device(logits=logits, token_ids=token_ids, tid2eid=tid2eid)
    T, E = logits.shape
    if (logits.dtype != torch.float32 or logits.stride(-1) != 1 or token_ids.shape != (T,) or tid2eid.dim() != 2
            or tid2eid.stride(-1) != 1):
        raise ValueError(f"hash routing needs float32 logits (T, E) with a contiguous last dim, token ids (T,) and "
                         f"a table (V, k); got {tuple(logits.shape)} {logits.dtype}, {tuple(token_ids.shape)}, "
                         f"{tuple(tid2eid.shape)}")
    k = tid2eid.shape[1]
    weights = torch.empty(T, k, dtype=torch.float32, device=logits.device)
    indices = torch.empty(T, k, dtype=torch.int64, device=logits.device)
    if T:
        _hash_route_kernel[(T,)](logits, token_ids.contiguous(), tid2eid, weights, indices, logits.stride(0),
                                 tid2eid.stride(0), float(route_scale), TOPK=k, BLOCK_K=triton.next_power_of_2(k),
                                 num_warps=1)
    return weights, indices
