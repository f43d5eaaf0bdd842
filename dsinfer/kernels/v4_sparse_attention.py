"""DeepSeek-V4 sparse attention over gathered rows with an attention sink (spec section 2.8), in Triton, and its
PyTorch twin.

Every query token t attends, with all H heads, to the rows kv[indices[t, j]] of one shared key/value pool (its
sliding window and its selected compressed entries); an index of -1 is skipped. The softmax has one extra logit
per head, the sink, that takes probability mass but contributes no value:
    p_j = exp(l_j - M) / (sum_j exp(l_j - M) + exp(sink_h - M)),  l_j = scale * q_h . kv_j,  o_h = sum_j p_j kv_j.
The kernel runs one program per (token, block of heads) and streams the token's indices in blocks with an online
softmax that starts from the sink (m = sink, l = 1), so a token with no valid index gets a zero output.
"""

from __future__ import annotations

import torch

from .triton_common import check_device, check_tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def sparse_attention_torch(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sink: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """q: (T, H, D); kv: (N, D); indices: (T, K) int32/int64 into kv, -1 = skip; sink: (H,) float32.
    Returns (T, H, D) in q's dtype; the math in float32."""
    valid = indices >= 0                                                       # (T, K)
    rows = kv[indices.clamp(min=0).long()].float()                             # (T, K, D)
    logits = torch.einsum("thd,tkd->thk", q.float(), rows) * scale
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    sinks = sink.float().view(1, -1, 1).expand(q.shape[0], -1, 1)
    probs = torch.cat([logits, sinks], dim=-1).softmax(dim=-1)[..., :-1]      # (T, H, K)
    return torch.einsum("thk,tkd->thd", probs, rows).to(q.dtype)


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sink: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """The Triton kernel; arguments and result as sparse_attention_torch (indices int32)."""
    check_tensor("q", q, DTYPES, 3)
    check_tensor("kv", kv, (q.dtype,), 2)
    check_tensor("indices", indices, (torch.int32,), 2)
    check_tensor("sink", sink, (torch.float32,), 1)
    check_device(q=q, kv=kv, indices=indices, sink=sink)
    T, H, D = q.shape
    if kv.shape[1] != D or indices.shape[0] != T or sink.shape[0] != H:
        raise ValueError(f"shapes do not agree: q {tuple(q.shape)}, kv {tuple(kv.shape)}, indices "
                         f"{tuple(indices.shape)}, sink {tuple(sink.shape)}")
    from .v4_sparse_attention_triton import launch
    out = torch.empty_like(q)
    if T:
        launch(q, kv, indices, sink, float(scale), out)
    return out
