"""EngineV4: a plain generation loop for DeepSeek-V4, with the Engine's interface (add_request / step / abort /
pop / iter_logits), so that LLM, the CLI and chat run V4 checkpoints until the paged engine learns V4's cache.

Each sequence keeps its own V4State (sliding-window rows, compressor buffers, compressed entries, indexer keys).
A step spends one token budget (max_num_batched_tokens) over at most max_num_seqs unfinished sequences, oldest
first: a decode costs one token, a prompt goes in whole or in chunks; the ragged batch runs as one forward pass.
There is no preemption and no prefix caching.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from .checkpoint.loader import read_config
from .checkpoint.loader_v4 import load_model_v4
from .config import EngineConfig
from .engine.engine import Engine, StepOutput
from .engine.sequence import Sequence, SequenceStatus
from .models.deepseek_v4 import Transformer
from .models.v4_state import V4State
from .sampling import Sampler, SamplingParams, compute_logprobs
from .tokenizer import IncrementalDetokenizer, Tokenizer


def is_v4_checkpoint(path: str | Path) -> bool:
    """Whether the checkpoint folder's config.json says model_type deepseek_v4."""
    return read_config(path)[1].get("model_type") == "deepseek_v4"


class EngineV4:
    def __init__(self, model_path: str | Path, config: EngineConfig | None = None, simulate_qat: bool = True):
        self.config = config = config or EngineConfig()
        path, model_config = read_config(model_path)
        self.tokenizer = Tokenizer.from_dir(path, model_config)
        self.device = config.torch_device
        self.model: Transformer
        self.model, self.args = load_model_v4(path, config.torch_dtype, self.device, simulate_qat, config.progress)
        self.max_model_len = config.max_model_len or self.args.max_position_embeddings
        if self.max_model_len > self.args.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings "
                             f"{self.args.max_position_embeddings}")
        self.vocab_limit = self.tokenizer.vocab_size
        self.eos_ids = self.tokenizer.eos_ids
        self.sampler = Sampler()
        self.default_generator = torch.Generator(self.device).manual_seed(config.seed)
        self.sequences: dict[int, Sequence] = {}
        self.states: dict[int, V4State] = {}
        self.queue: list[Sequence] = []              # unfinished sequences, oldest first
        self._ids = itertools.count()

    # -- requests ------------------------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None) -> int:
        """Queue a prompt (text, or token ids); returns its request id."""
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check_prompt(ids)
        seq = Sequence(next(self._ids), ids, len(ids), params, self.max_model_len)
        if params.seed is not None:
            seq.generator = torch.Generator(self.device).manual_seed(params.seed)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer)
        seq.status = SequenceStatus.RUNNING
        self.sequences[seq.seq_id] = seq
        self.states[seq.seq_id] = self.model.new_state()
        self.queue.append(seq)
        return seq.seq_id

    _check_prompt = Engine._check_prompt
    _cut_at_stop = staticmethod(Engine._cut_at_stop)

    def abort(self, seq_id: int) -> None:
        seq = self.sequences.get(seq_id)
        if seq is not None and not seq.finished:
            self._finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.queue)

    def pop(self, seq_id: int) -> Sequence:
        """Forget a finished request and return it."""
        return self.sequences.pop(seq_id)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self.queue.remove(seq)
        self.states.pop(seq.seq_id, None)

    # -- one step --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        seqs, num_new, budget = [], [], self.config.max_num_batched_tokens
        for seq in self.queue[:self.config.max_num_seqs]:
            n = min(seq.num_tokens - self.states[seq.seq_id].num_tokens, budget)
            if n > 0:
                seqs.append(seq)
                num_new.append(n)
                budget -= n
        if not seqs:
            return []
        states = [self.states[s.seq_id] for s in seqs]
        ids = [t for s, st, n in zip(seqs, states, num_new) for t in s.token_ids[st.num_tokens:st.num_tokens + n]]
        h = self.model(torch.tensor(ids, device=self.device), states, num_new)
        last = torch.tensor(list(itertools.accumulate(num_new)), device=self.device) - 1
        ready = [i for i, (s, st) in enumerate(zip(seqs, states)) if st.num_tokens == s.num_tokens]
        if not ready:
            return []
        logits = self.model.compute_logits(h[last[ready]])
        ready_seqs = [seqs[i] for i in ready]
        tokens = self.sampler(logits, [s.params for s in ready_seqs],
                              [s.generator or self.default_generator for s in ready_seqs],
                              vocab_limit=self.vocab_limit).tolist()
        outputs = [self._append(seq, token) for seq, token in zip(ready_seqs, tokens)]
        want = [i for i, s in enumerate(ready_seqs) if s.params.logprobs is not None]
        if want:
            found = compute_logprobs(logits[want], [tokens[i] for i in want],
                                     [ready_seqs[i].params.logprobs for i in want], vocab_limit=self.vocab_limit)
            for i, lp in zip(want, found):
                outputs[i].logprobs = lp
        return outputs

    def _append(self, seq: Sequence, token: int) -> StepOutput:
        """Add a sampled token; finish on EOS, a stop string, max_tokens or the context limit (as Engine does)."""
        seq.token_ids.append(token)
        reason = None
        if token in self.eos_ids and not seq.params.ignore_eos:
            reason = "stop"
        else:
            seq.text += seq.detokenizer.step(token)
            if seq.params.stop and self._cut_at_stop(seq):
                reason = "stop"
        if reason is None and (seq.num_generated >= seq.params.max_tokens or seq.num_tokens >= seq.max_len):
            reason = "length"
            seq.text += seq.detokenizer.flush()
        if reason is not None:
            self._finish(seq, reason)
        hold = 0 if reason else max((len(s) for s in seq.params.stop), default=1) - 1
        end = max(seq.num_emitted_chars, len(seq.text) - hold)
        new_text, seq.num_emitted_chars = seq.text[seq.num_emitted_chars:end], end
        return StepOutput(seq.seq_id, [token], new_text, reason is not None, reason)

    # -- scoring ----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def iter_logits(self, token_ids: list[int]):
        """Next-token logits at every position of one sequence, (n, V) float32, in prefill-sized chunks."""
        self._check_prompt(token_ids[:-1] or token_ids)
        state, chunk = self.model.new_state(), self.config.max_num_batched_tokens
        for start in range(0, len(token_ids), chunk):
            part = token_ids[start:start + chunk]
            h = self.model(torch.tensor(part, device=self.device), [state], [len(part)])
            yield self.model.compute_logits(h)
