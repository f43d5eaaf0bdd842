"""LLM: the offline Python API.

    from dsinfer import LLM, SamplingParams
    llm = LLM("path/to/checkpoint", device="cpu", dtype="bfloat16")
    out = llm.generate(["ROMEO:"], SamplingParams(temperature=0.8, max_tokens=64))[0].text
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .assets import default_model_path
from .config import EngineConfig
from .engine import Engine
from .sampling import SamplingParams


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]          # generated tokens (an end-of-sequence token that stopped it included)
    text: str                     # generated text (stop strings and end-of-sequence not included)
    finish_reason: str            # "stop" or "length"


class LLM:
    def __init__(self, model: str | Path | None = None, device: str = "auto", dtype: str = "bfloat16",
                 simulate_qat: bool | None = None, **kwargs):
        """`model`: a Hugging Face checkpoint folder (None = the bundled model); kwargs: EngineConfig fields.
        `simulate_qat` (DeepSeek-V4 only, default on): round as the reference's forward pass does (FP8 KV, FP4
        indexer); off matches HF transformers."""
        path = model if model is not None else default_model_path()
        config = EngineConfig(device=device, dtype=dtype, **kwargs)
        self.engine = Engine(path, config, simulate_qat=simulate_qat)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | list[int] | list[str | list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Complete each prompt (text or token ids); results come back in input order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise ValueError("prompts must be a string, a list of token ids, or a non-empty list of those")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        ids = [self.engine.add_request(p, sp or SamplingParams()) for p, sp in zip(prompts, params)]
        try:
            while self.engine.has_unfinished():
                self.engine.step()
        except BaseException:
            for i in ids:
                self.engine.abort(i)
            raise
        return [self._output(self.engine.pop(i)) for i in ids]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             **template_kwargs) -> RequestOutput | list[RequestOutput]:
        """Reply to a conversation (or to each of a list of conversations) through the chat template.
        template_kwargs go to the template, e.g. thinking=True for V3.1."""
        many = isinstance(messages, list) and messages and isinstance(messages[0], list)
        convs = messages if many else [messages]
        prompts = [self.tokenizer.encode_chat(c, add_generation_prompt=True, **template_kwargs) for c in convs]
        outs = self.generate(prompts, sampling_params)
        return outs if many else outs[0]

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one completion as it is generated."""
        seq_id = self.engine.add_request(prompt, sampling_params or SamplingParams())
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.seq_id == seq_id and out.new_text:
                        yield out.new_text
        finally:
            self.engine.abort(seq_id)
            self.engine.pop(seq_id)

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Next-token logits at every position: (len(token_ids), vocab_size) float32 on CPU."""
        return torch.cat([chunk.cpu() for chunk in self.engine.iter_logits(list(token_ids))])

    def shutdown(self) -> None:
        """Stop the other ranks of a tensor-parallel LLM (done at exit too); then another may be started."""
        if hasattr(self.engine, "shutdown"):
            self.engine.shutdown()

    @staticmethod
    def _output(seq) -> RequestOutput:
        return RequestOutput(seq.token_ids[:seq.num_prompt_tokens], seq.output_ids, seq.text, seq.finish_reason)
