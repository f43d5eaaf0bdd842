"""Perplexity over sliding windows, every token scored exactly once.

Windows of `window` tokens start every `stride` tokens; each is a fresh sequence (positions from 0, no cache
carried over). Token j (1 <= j < n) is scored once, in the first window that ends after it, from the logits at
j - 1; so tokens near a window's start are scored with at least window - stride tokens of context (except in the
first window). The bundled model's card records HF transformers' perplexity computed the same way.
"""

from __future__ import annotations

import math

import torch

from .engine import Engine


def perplexity(engine: Engine, token_ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """Returns (perplexity, tokens evaluated)."""
    n = len(token_ids)
    if n < 2:
        raise ValueError("the text must have at least two tokens")
    if not 2 <= window <= engine.max_model_len:
        raise ValueError(f"window must be in [2, {engine.max_model_len}] (max model length), got {window}")
    if not 1 <= stride <= window - 1:
        raise ValueError(f"stride must be in [1, window - 1 = {window - 1}], got {stride}")
    ids = torch.tensor(token_ids, device=engine.device)
    nll, count, prev_end, begin = 0.0, 0, 0, 0
    while True:
        end = min(begin + window, n)
        first = max(prev_end, begin + 1)                 # first token scored in this window
        row = 0                                          # window row of the current logits chunk
        for logits in engine.iter_logits(token_ids[begin:end]):
            rows = torch.arange(row, row + logits.shape[0], device=logits.device)
            targets = rows + begin + 1                   # the token each row predicts
            keep = (targets >= first) & (targets < end)
            if keep.any():
                logp = logits[keep].log_softmax(dim=-1)
                tgt = ids[targets[keep]]
                nll -= logp.gather(1, tgt[:, None]).sum().item()
                count += int(keep.sum())
            row += logits.shape[0]
        prev_end = end
        if end == n:
            break
        begin += stride
    return math.exp(nll / count), count
