"""A request as the engine sees it: its tokens, how many of them are in the cache, its pages, its output text."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from ..sampling import SamplingParams
from ..tokenizer import IncrementalDetokenizer

PENDING = -1     # a token sampled on the device that the host has not read yet (async scheduling)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    token_ids: list[int]                       # prompt followed by generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    max_len: int                               # prompt + generated tokens never exceed this
    status: SequenceStatus = SequenceStatus.WAITING
    num_cached_tokens: int = 0                 # tokens whose latents are in the cache
    block_table: list[int] = field(default_factory=list)
    page_hashes: list[int] = field(default_factory=list)   # prefix hash of each full page (prefix caching)
    state_slot: int | None = None              # DeepSeek-V4: its window/compressor state slot (v4_cache.py)
    generator: torch.Generator | None = None   # set when params.seed is given
    detokenizer: IncrementalDetokenizer | None = None
    text: str = ""                             # generated text so far (stop strings cut off)
    num_emitted_chars: int = 0                 # text handed out by the engine so far (streaming)
    finish_reason: str | None = None           # "stop" (EOS or stop string), "length" or "abort"
    pending_row: int = -1                      # row of its PENDING last token in the step that sampled it

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def reached_length(self) -> bool:
        """No further token is wanted (max_tokens or max_len reached), whatever the last one turns out to be."""
        return self.num_generated >= self.params.max_tokens or self.num_tokens >= self.max_len

    @property
    def finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def max_cache_tokens(self) -> int:
        """Cache rows this request may need: every token but the last one sampled is written to the cache."""
        return min(self.num_prompt_tokens + self.params.max_tokens, self.max_len)


def fill_pending(ids: torch.Tensor, positions: list[int], rows: list[int], prev_tokens: torch.Tensor | None) -> None:
    """Write into the device input ids `ids` the tokens the previous step sampled on the device: ids[positions[i]]
    = prev_tokens[rows[i]] (the host holds PENDING there)."""
    if not positions:
        return
    if prev_tokens is None:
        raise RuntimeError("a step has PENDING input tokens but no previous step's tokens to fill them from")
    n = len(positions)
    if positions == rows == list(range(n)):               # steady decoding: the same sequences, in the same order
        ids[:n].copy_(prev_tokens[:n])
    else:
        index = torch.tensor([positions, rows], dtype=torch.int64).to(ids.device, non_blocking=True)
        ids[index[0]] = prev_tokens[index[1]]
