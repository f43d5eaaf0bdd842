"""Sliding-window perplexity against HF transformers scoring the same windows token by token (the oracle)."""

import math

import fixtures
import pytest
import torch

from dsinfer import LLM
from dsinfer.perplexity import perplexity


def hf_perplexity(model, ids, window, stride):
    """Score token j once, in the first window that ends after it, from the logits at j - 1."""
    scored = {}
    begin = 0
    while True:
        end = min(begin + window, len(ids))
        with torch.no_grad():
            logp = model(torch.tensor([ids[begin:end]])).logits[0].float().log_softmax(-1)
        for j in range(begin + 1, end):
            scored.setdefault(j, -logp[j - 1 - begin, ids[j]].item())
        if end == len(ids):
            break
        begin += stride
    assert sorted(scored) == list(range(1, len(ids)))
    return math.exp(sum(scored.values()) / len(scored)), len(scored)


@pytest.mark.parametrize("window, stride", [(16, 8), (16, 5), (64, 32), (200, 100)])
def test_matches_hf(window, stride, checkpoint):
    llm = LLM(checkpoint("v3"), device="cpu", dtype="float32", progress=False, max_num_batched_tokens=24)
    ids = llm.tokenizer.encode("To be, or not to be, that is the question. The quick brown fox jumps. " * 3)
    ppl, n = perplexity(llm.engine, ids, window, stride)
    ref, ref_n = hf_perplexity(fixtures.build_hf_model("v3"), ids, window, stride)
    assert n == ref_n == len(ids) - 1
    assert ppl == pytest.approx(ref, rel=1e-5)


def test_bad_windows(checkpoint):
    llm = LLM(checkpoint("v3"), device="cpu", dtype="float32", progress=False, max_model_len=32)
    with pytest.raises(ValueError, match="window must be in"):
        perplexity(llm.engine, list(range(50)), 64, 32)
    with pytest.raises(ValueError, match="stride must be in"):
        perplexity(llm.engine, list(range(50)), 16, 16)
