"""DeepSeek-V4 (Flash, Pro) read top to bottom: embedding copied into hc_mult hyper-connection streams ->
n_layers x (hc_pre -> attn_norm -> attention -> hc_post, then hc_pre -> ffn_norm -> MoE -> hc_post) ->
hc_head -> norm -> head. The pieces live beside this file: v4_attention (with v4_compressor and v4_indexer),
v4_moe, hyper_connections; what a sequence carries between calls is in v4_state.

A forward pass takes a flat batch of new tokens from several sequences (any number each: a whole prompt, a chunk
of one, or one decode token) together with each sequence's V4State; attention runs per sequence, everything
else on the flat batch. `decode` runs one new token per sequence against stores that hold every sequence's state
(the engine's slots and pages), with no per-sequence code or host value, so the engine can capture it as a CUDA
graph. The MTP block (mtp.*) is not built.
"""

from __future__ import annotations

import torch
from torch import nn

from .args_v4 import ModelArgsV4
from .hyper_connections import hc_head, hc_post, hc_pre
from .layers import Embedding, Linear, RMSNorm
from .rope import rope_cos_sin
from .v4_attention import Attention
from .v4_moe import MoE
from .v4_state import V4Batch, V4DecodeBatch, V4State


def _fp32(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=torch.float32), requires_grad=False)


class Block(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgsV4):
        super().__init__()
        self.norm_eps, self.hc_eps, self.hc_iters = args.norm_eps, args.hc_eps, args.hc_sinkhorn_iters
        self.attn_backend = "torch"          # "triton": the hyper-connection kernels (layers.set_attn_backend)
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(layer_id, args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn = MoE(layer_id, args)
        mix, hc_dim = (2 + args.hc_mult) * args.hc_mult, args.hc_mult * args.dim
        self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = _fp32(mix, hc_dim), _fp32(mix), _fp32(3)
        self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale = _fp32(mix, hc_dim), _fp32(mix), _fp32(3)

    def forward(self, x: torch.Tensor, batch: V4Batch | V4DecodeBatch, layer_id: int,
                rope_table: torch.Tensor) -> torch.Tensor:
        """x: (T, hc, D) streams -> (T, hc, D)."""
        k = self.attn_backend == "triton"
        y, post, comb = hc_pre(x, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base, self.hc_iters,
                               self.hc_eps, self.norm_eps, k)
        if isinstance(batch, V4DecodeBatch):
            a = self.attn.decode(self.attn_norm(y), batch, batch.layers[layer_id], rope_table)
        else:
            a = self.attn(self.attn_norm(y), batch, [s.layers[layer_id] for s in batch.states], rope_table)
        x = hc_post(a, x, post, comb, k)
        y, post, comb = hc_pre(x, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base, self.hc_iters,
                               self.hc_eps, self.norm_eps, k)
        return hc_post(self.ffn(self.ffn_norm(y), batch.token_ids), x, post, comb, k)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgsV4, simulate_qat: bool = True):
        super().__init__()
        self.args = args
        self.embed = Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.head = Linear(args.dim, args.vocab_size)
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = \
            _fp32(args.hc_mult, args.hc_mult * args.dim), _fp32(args.hc_mult), _fp32(1)
        self.rope_tables: dict[str, torch.Tensor] = {}    # "main" / "compress": (positions, rope/2, 2) float32
        self.set_simulate_qat(simulate_qat)

    @property
    def simulate_qat(self) -> bool:
        return self._simulate_qat

    def set_simulate_qat(self, on: bool) -> None:
        """Round the KV non-rotary dims to FP8 and the indexer queries/keys to FP4 in the forward pass, as the
        reference does (on), or keep them unrounded, as HF transformers does (off)."""
        self._simulate_qat = bool(on)
        for layer in self.layers:
            layer.attn.simulate_qat = self._simulate_qat

    def init_rope(self, max_positions: int, device: torch.device) -> None:
        """Precompute cos/sin of both rotary settings for positions [0, max_positions)."""
        a = self.args
        self.rope_tables = {"main": rope_cos_sin(a.rope, a.rope_head_dim, max_positions, device),
                            "compress": rope_cos_sin(a.compress_rope, a.rope_head_dim, max_positions, device)}

    def new_state(self) -> V4State:
        """The empty state of a new sequence."""
        return V4State([layer.attn.new_state() for layer in self.layers])

    def forward(self, input_ids: torch.Tensor, states: list[V4State], num_new: list[int]) -> torch.Tensor:
        """input_ids: (T,) the new tokens of len(states) sequences, num_new[b] of them for sequence b, in order.
        Advances each state; returns the final hidden states (T, D), normalised."""
        if sum(num_new) != input_ids.shape[0] or len(num_new) != len(states):
            raise ValueError("num_new must give one count per state, summing to the number of input ids")
        device = input_ids.device
        starts = [0]
        for n in num_new[:-1]:
            starts.append(starts[-1] + n)
        start_pos = [s.num_tokens for s in states]
        positions = torch.cat([torch.arange(p, p + n) for p, n in zip(start_pos, num_new)]).to(device)
        end = max(p + n for p, n in zip(start_pos, num_new))
        if not self.rope_tables or self.rope_tables["main"].shape[0] < end:
            self.init_rope(max(end, 2 * self.rope_tables["main"].shape[0] if self.rope_tables else end), device)
        batch = V4Batch(starts, list(num_new), start_pos, positions, input_ids, states)
        h = self._layers(input_ids, batch)
        for s, n in zip(states, num_new):
            s.num_tokens += n
        return h

    def decode(self, batch: V4DecodeBatch) -> torch.Tensor:
        """One new token per sequence, batch.token_ids (B,), against the states in batch.layers (the rotary
        tables must cover every position: init_rope). Returns the final hidden states (B, D), normalised."""
        return self._layers(batch.token_ids, batch)

    def _layers(self, input_ids: torch.Tensor, batch: V4Batch | V4DecodeBatch) -> torch.Tensor:
        h = self.embed(input_ids)
        x = h.unsqueeze(1).expand(-1, self.args.hc_mult, -1).contiguous()            # (T, hc, D)
        for i, layer in enumerate(self.layers):
            x = layer(x, batch, i, self.rope_tables[layer.attn.rope_kind])
        y = hc_head(x, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.args.hc_eps, self.args.norm_eps)
        return self.norm(y)

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, vocab) float32."""
        return self.head(h).float()
