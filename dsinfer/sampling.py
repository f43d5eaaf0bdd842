"""Per-request sampling parameters and batched on-device sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities of one sampled position, from the model's distribution (before temperature/top-k/top-p)."""

    token_id: int
    logprob: float                       # of the sampled token
    top: list[tuple[int, float]]         # the most likely (token id, logprob), best first; SamplingParams.logprobs long


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0        # 0 = greedy; otherwise logits are divided by it, in (0, 100]
    top_p: float = 1.0              # nucleus: smallest set of tokens whose probability reaches top_p, in (0, 1]
    top_k: int = 0                  # keep the k most likely tokens; 0 (or -1) = all
    max_tokens: int = 128           # new tokens to generate, >= 1
    stop: tuple[str, ...] = ()      # stop strings; the text ends before the first one
    seed: int | None = None         # per-request seed: same seed, same prompt -> same tokens, whatever the batch
    ignore_eos: bool = False        # keep going past the end-of-sequence token
    logprobs: int | None = None     # return the sampled token's logprob and this many top ones (0..20); None = off

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or a positive count, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2^63), got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be None (off) or in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Samples one token per row: greedy rows take the argmax; others temperature, top-k, top-p, then an
    exponential race (argmax of p / E with E ~ Exp(1)), which draws from p without a host sync."""

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None], vocab_limit: int | None = None) -> torch.Tensor:
        """logits: (B, V) float32 -> (B,) int64 token ids. vocab_limit: ids >= it are never drawn."""
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits = logits.clone()
            logits[:, vocab_limit:] = float("-inf")
        greedy = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy
        device = logits.device
        temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=device)
        probs = self._filtered_probs(logits / temps[:, None], params)
        noise = torch.empty_like(probs)
        for i, g in enumerate(generators):
            noise[i].exponential_(generator=g)
        sampled = (probs / noise).argmax(dim=-1)
        is_greedy = torch.tensor([p.greedy for p in params], device=device)
        return torch.where(is_greedy, greedy, sampled)

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        top_k = [p.top_k if p.top_k > 0 else logits.shape[-1] for p in params]
        top_p = [p.top_p for p in params]
        if all(k >= logits.shape[-1] for k in top_k) and all(p >= 1 for p in top_p):
            return logits.softmax(dim=-1)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(logits.shape[-1], device=logits.device)
        k = torch.tensor(top_k, device=logits.device)
        sorted_logits = sorted_logits.masked_fill(rank[None, :] >= k[:, None], float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs           # mass of strictly more likely tokens
        p = torch.tensor(top_p, device=logits.device)
        sorted_probs = sorted_probs.masked_fill(before >= p[:, None], 0.0)
        probs = torch.zeros_like(sorted_probs).scatter_(1, order, sorted_probs)
        return probs / probs.sum(dim=-1, keepdim=True)


def compute_logprobs(logits: torch.Tensor, token_ids: list[int], num_top: list[int],
                     vocab_limit: int | None = None) -> list[TokenLogprobs]:
    """logits: (B, V) float32 raw (not temperature-scaled); token_ids: the B sampled ids; num_top[i]: top entries
    wanted for row i. Log-softmax over ids < vocab_limit, one host sync for the whole batch."""
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = logits[:, :vocab_limit]
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(token_ids, device=logp.device)[:, None])[:, 0]
    k = max(num_top, default=0)
    top_lp, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    chosen, top_lp, top_ids = chosen.tolist(), top_lp.tolist(), top_ids.tolist()
    return [TokenLogprobs(t, c, list(zip(ids[:n], lps[:n])))
            for t, c, ids, lps, n in zip(token_ids, chosen, top_ids, top_lp, num_top)]
