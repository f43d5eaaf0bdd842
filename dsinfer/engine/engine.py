"""Engine: requests in, tokens out, one `step()` at a time. LLM, the CLI and the server all drive this."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import read_config
from ..config import EngineConfig
from ..kernels.mla_triton import triton_available
from ..models import ModelArgs
from ..models.args_v4 import ModelArgsV4
from ..models.layers import set_attn_backend, set_fp8_impl
from ..models.mla import fuse_input_projections
from ..models.moe import set_moe_backend
from ..models.v4_attention import fuse_input_projections as fuse_v4_input_projections
from ..parallel import ParallelState
from ..sampling import Sampler, SamplingParams, TokenLogprobs, compute_logprobs
from ..tokenizer import IncrementalDetokenizer, Tokenizer
from .block_manager import BlockManager, V4BlockManager
from .kv_cache import KVCache, cache_bytes_per_page
from .runner import ModelRunner
from .scheduler import Scheduler
from .sequence import PENDING, Sequence
from .v4_cache import V4Cache, v4_cache_bytes
from .v4_runner import V4ModelRunner, load_v4
from .worker import LockstepRunner, WorkerSpec


@dataclass
class StepOutput:
    """What one step produced for one request."""

    seq_id: int
    new_token_ids: list[int]
    new_text: str                  # text that became final in this step (held back while it may start a stop string)
    finished: bool
    finish_reason: str | None
    logprobs: TokenLogprobs | None = None   # when the request's SamplingParams.logprobs is set


@dataclass
class _InFlight:
    """An async step's sampled tokens: on the device (the next step's input ids) and on their way to the host."""

    seqs: list[Sequence]
    index: list[int]                  # where each sequence's PENDING token sits in its token_ids
    tokens: torch.Tensor              # (B,) int64 on the device
    host: torch.Tensor                # (B,) its copy in pinned host memory, valid once `event` has passed
    event: torch.cuda.Event | None

    @classmethod
    def launch(cls, seqs: list[Sequence], tokens: torch.Tensor) -> _InFlight:
        """Start the copy of `tokens` to the host and put PENDING in each sequence's place for them."""
        event = None
        host = tokens
        if tokens.is_cuda:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        index = []
        for row, seq in enumerate(seqs):
            index.append(seq.num_tokens)
            seq.token_ids.append(PENDING)
            seq.pending_row = row
        return cls(seqs, index, tokens, host, event)

    def read(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class Engine:
    def __init__(self, model_path: str | Path, config: EngineConfig | None = None, simulate_qat: bool | None = None):
        """`simulate_qat` (DeepSeek-V4 only, default on): round as the reference's forward pass does (FP8 KV,
        FP4 indexer); off matches HF transformers."""
        config = config or EngineConfig()
        path, model_config = read_config(model_path)
        tokenizer = Tokenizer.from_dir(path, model_config)
        if model_config.get("model_type") == "deepseek_v4":
            if config.tensor_parallel_size > 1:
                raise ValueError("tensor parallelism does not cover DeepSeek-V4 yet; use tensor_parallel_size 1")
            self._setup(*load_v4(path, config, simulate_qat), tokenizer, config)
            return
        if simulate_qat is not None:
            raise ValueError("simulate_qat applies to DeepSeek-V4 checkpoints only")
        self._start(WorkerSpec(config, model_path=str(path)), tokenizer)

    @classmethod
    def from_model(cls, model: torch.nn.Module, args: ModelArgs, config: EngineConfig,
                   tokenizer: Tokenizer | None = None, parallel: ParallelState | None = None) -> Engine:
        """An engine over a model built elsewhere (e.g. random weights for `dsinfer bench`), of one process (or
        this rank's part under `parallel`). Without a tokenizer, prompts must be token ids and outputs carry
        no text."""
        engine = cls.__new__(cls)
        engine._setup(model, args, tokenizer, config, parallel)
        return engine

    @classmethod
    def from_random(cls, hf_config: dict, config: EngineConfig, tokenizer: Tokenizer | None = None) -> Engine:
        """Random weights with the shapes of an HF config (benchmarks), on config.tensor_parallel_size ranks."""
        engine = cls.__new__(cls)
        engine._start(WorkerSpec(config, random_config=hf_config), tokenizer)
        return engine

    def _start(self, spec: WorkerSpec, tokenizer: Tokenizer | None) -> None:
        """Start the other ranks, if any (launch.py), build this rank's part of the model, set up."""
        from ..launch import start
        parallel = start(spec)
        try:
            model = args = error = None
            try:
                model, args = spec.build(parallel)
            except Exception as e:  # noqa: BLE001 -- every rank reports, so that all stop together
                error = e
            parallel.check_setup(error)
            self._setup(model, args, tokenizer, spec.config, parallel)
        except BaseException:
            parallel.abort()
            raise

    def shutdown(self) -> None:
        """Stop the other ranks of a tensor-parallel engine (also done at exit); nothing for one process."""
        self.parallel.shutdown()

    def _setup(self, model: torch.nn.Module, args: ModelArgs, tokenizer: Tokenizer | None,
               config: EngineConfig, parallel: ParallelState | None = None) -> None:
        self.config, self.model, self.args, self.tokenizer = config, model, args, tokenizer
        self.parallel = parallel or ParallelState.single(config.torch_device)
        self.device, self.dtype = self.parallel.device, config.torch_dtype
        self.vocab_limit = tokenizer.vocab_size if tokenizer else None
        self.eos_ids = tokenizer.eos_ids if tokenizer else set()
        # one GEMM for the projections of the layer input: MLA's wq_a and wkv_a (not across TP-split wq), V4's
        # wq_a and wkv, and each V4 compressor's wkv and wgate
        (fuse_v4_input_projections if isinstance(args, ModelArgsV4) else fuse_input_projections)(self.model)
        set_fp8_impl(self.model, config.fp8_impl)
        backend = config.attn_backend
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" and triton_available() else "torch"
        set_attn_backend(self.model, backend)
        moe_backend = config.moe_backend
        if moe_backend == "auto":
            moe_backend = "triton" if self.device.type == "cuda" and triton_available() else "torch"
        set_moe_backend(self.model, moe_backend)
        self.max_model_len = config.max_model_len or self.args.max_position_embeddings
        if self.max_model_len > self.args.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings "
                             f"{self.args.max_position_embeddings}")
        self.model.init_rope(self.max_model_len, self.device)
        if isinstance(self.args, ModelArgsV4):     # state slots (window, compressor buffers) + pages of entries
            if config.enable_prefix_caching:
                raise ValueError("prefix caching is not supported for DeepSeek-V4 (its sliding-window and compressor "
                                 "state is not kept per page); set enable_prefix_caching=False (--no-prefix-caching)")
            num_slots = config.max_num_seqs + 1    # one per running sequence, one for scoring (iter_logits)
            self.cache = V4Cache(self.args, self._num_pages(), config.page_size, num_slots, self.dtype, self.device)
            self.block_manager = V4BlockManager(self.cache.num_pages, config.page_size, num_slots)
            self.runner = V4ModelRunner(self.model, self.cache, self.device)
        else:
            self.cache = KVCache(self.args, self._num_pages(), config.page_size, self.dtype, self.device)
            self.block_manager = BlockManager(self.cache.num_pages, config.page_size,
                                              config.enable_prefix_caching is not False)
            if self.parallel.world_size > 1 and self.parallel.is_driver:      # sends each batch to the other ranks
                self.runner = LockstepRunner(self.model, self.cache, self.device, self.parallel)
            else:
                self.runner = ModelRunner(self.model, self.cache, self.device)
        if self.device.type == "cuda" and not config.enforce_eager:
            if backend != "triton" or moe_backend != "triton":
                raise ValueError("CUDA graphs need attn_backend and moe_backend 'triton' (the torch twins wait "
                                 "for the host); use them, or set enforce_eager")
            self.runner.capture_cuda_graphs(min(config.cuda_graph_max_batch, config.max_num_seqs), self.max_model_len)
            if self.parallel.world_size > 1:     # NCCL's teardown waits for graphs holding its collectives
                self.parallel.before_leaving.append(self.runner.graphs.release)
        self.scheduler = Scheduler(config, self.block_manager)
        self.async_scheduling = (self.parallel.world_size == 1 and
                                 (config.async_scheduling or (config.async_scheduling is None and
                                                              self.device.type == "cuda")))
        self._in_flight: _InFlight | None = None
        self.sampler = Sampler()
        self.default_generator = torch.Generator(self.device).manual_seed(config.seed)
        self.sequences: dict[int, Sequence] = {}
        self._ids = itertools.count()

    def _num_pages(self) -> int:
        c = self.config
        if isinstance(self.args, ModelArgsV4):
            per_page, per_slot = v4_cache_bytes(self.args, c.page_size, self.dtype)
            reserved = per_slot * (c.max_num_seqs + 1)                  # the state slots come first
        else:
            per_page, reserved = cache_bytes_per_page(self.args, c.page_size, self.dtype), 0
        wanted = c.max_num_seqs * -(-self.max_model_len // c.page_size)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()     # blocks cached by the allocator (building the weights) count as free
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - (1 - c.gpu_memory_utilization) * total
        else:
            budget = c.cpu_cache_gib * 2**30
        budget -= reserved
        return self.parallel.agree_min(max(0, min(int(budget // max(per_page, 1)), wanted)))   # same on every rank

    # -- requests ------------------------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None) -> int:
        """Queue a prompt (text, or token ids); returns its request id."""
        params = params or SamplingParams()
        if isinstance(prompt, str) and self.tokenizer is None:
            raise ValueError("this engine has no tokenizer; pass prompts as token ids")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check_prompt(ids)
        seq = Sequence(next(self._ids), ids, len(ids), params, self.max_model_len)
        if params.seed is not None:
            seq.generator = torch.Generator(self.device).manual_seed(params.seed)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer) if self.tokenizer else None
        self.scheduler.add(seq)
        self.sequences[seq.seq_id] = seq
        return seq.seq_id

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("the prompt is empty")
        if not all(isinstance(t, int) and 0 <= t < self.args.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.args.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; the context holds {self.max_model_len} "
                             "(prompt plus at least one generated token)")

    def abort(self, seq_id: int) -> None:
        seq = self.sequences.get(seq_id)
        if seq is not None and not seq.finished:
            if seq.token_ids[-1] == PENDING:         # an async step's token, never read: not part of the output
                seq.token_ids.pop()
            self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def pop(self, seq_id: int) -> Sequence:
        """Forget a finished request and return it."""
        return self.sequences.pop(seq_id)

    # -- one step --------------------------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Run one forward pass and return what it made final. With async scheduling the tokens a step samples
        stay on the device as the next step's input (the host holds PENDING in their place) and are read back
        after that step is launched, so the outputs returned are the previous step's, and the host's work here
        runs while the GPU computes. A sequence that stops on EOS or a stop string has then had one more token
        computed, which is dropped; one that reaches its length is not scheduled again."""
        seqs, num_new = self.scheduler.schedule()
        prev, self._in_flight = self._in_flight, None
        if not seqs:
            return self._resolve(prev) if prev else []
        logits = self.runner.run(seqs, num_new, prev_tokens=prev.tokens if prev else None)
        for seq, n in zip(seqs, num_new):
            seq.num_cached_tokens += n
        ready = [i for i, s in enumerate(seqs) if s.num_cached_tokens == s.num_tokens]   # prompt fully cached
        ready_seqs = [seqs[i] for i in ready]
        tokens = None
        if ready:
            if len(ready) < len(seqs):              # (a gather, with its host-to-device index copy, only if needed)
                logits = logits[ready]
            tokens = self.sampler(logits, [s.params for s in ready_seqs],
                                  [s.generator or self.default_generator for s in ready_seqs],
                                  vocab_limit=self.vocab_limit)
            if self.async_scheduling and all(s.params.logprobs is None for s in ready_seqs):
                self._in_flight = _InFlight.launch(ready_seqs, tokens)
                ready_seqs = []
        outputs = self._resolve(prev) if prev else []       # fills this step's PENDING inputs: now commit
        for seq in seqs:
            if not seq.finished:
                self.block_manager.commit(seq)
        if ready_seqs:
            outputs += self._accept_now(ready_seqs, logits, tokens.tolist())
        return outputs

    def _accept_now(self, seqs: list[Sequence], logits: torch.Tensor, tokens: list[int]) -> list[StepOutput]:
        """Append each sequence's sampled token (skipping any the previous step just finished), with logprobs."""
        outputs, rows = [], []
        for row, (seq, token) in enumerate(zip(seqs, tokens)):
            if not seq.finished:
                seq.token_ids.append(token)
                outputs.append(self._accept(seq, seq.num_tokens - 1))
                rows.append(row)
        want = [i for i, row in enumerate(rows) if seqs[row].params.logprobs is not None]
        if want:
            found = compute_logprobs(logits[[rows[i] for i in want]], [tokens[rows[i]] for i in want],
                                     [seqs[rows[i]].params.logprobs for i in want], vocab_limit=self.vocab_limit)
            for i, lp in zip(want, found):
                outputs[i].logprobs = lp
        return outputs

    def _resolve(self, step: _InFlight) -> list[StepOutput]:
        """Read back an async step's tokens (waiting for its copy only) and accept them in place of PENDING."""
        outputs = []
        for seq, i, token in zip(step.seqs, step.index, step.read()):
            if not seq.finished:                     # aborted, or stopped by its previous token
                seq.token_ids[i] = token
                outputs.append(self._accept(seq, i))
        return outputs

    def _accept(self, seq: Sequence, i: int) -> StepOutput:
        """Take token_ids[i], the token sampled last for `seq`: check EOS, stop strings and length, stream its
        text. When it finishes the sequence, tokens after it (a PENDING one of an async step) are dropped."""
        token = seq.token_ids[i]
        reason = None
        if token in self.eos_ids and not seq.params.ignore_eos:
            reason = "stop"
        elif seq.detokenizer is not None:
            seq.text += seq.detokenizer.step(token)
            if seq.params.stop and self._cut_at_stop(seq):
                reason = "stop"
        if reason is None and (i + 1 - seq.num_prompt_tokens >= seq.params.max_tokens or i + 1 >= seq.max_len):
            reason = "length"
            seq.text += seq.detokenizer.flush() if seq.detokenizer is not None else ""
        if reason is not None:
            del seq.token_ids[i + 1:]
            self.scheduler.finish(seq, reason)
        hold = 0 if reason else max((len(s) for s in seq.params.stop), default=1) - 1
        end = max(seq.num_emitted_chars, len(seq.text) - hold)
        new_text, seq.num_emitted_chars = seq.text[seq.num_emitted_chars:end], end
        return StepOutput(seq.seq_id, [token], new_text, reason is not None, reason)

    @staticmethod
    def _cut_at_stop(seq: Sequence) -> bool:
        """Cut the text before the first stop string it now contains."""
        longest = max(len(s) for s in seq.params.stop)
        tail_from = max(0, seq.num_emitted_chars - longest)
        hits = [i for s in seq.params.stop if (i := seq.text.find(s, tail_from)) >= 0]
        if hits:
            seq.text = seq.text[:min(hits)]
            return True
        return False

    # -- scoring ----------------------------------------------------------------------------------------------

    def iter_logits(self, token_ids: list[int]):
        """Next-token logits at every position of one sequence, (n, V) float32, in prefill-sized chunks."""
        self._check_prompt(token_ids[:-1] or token_ids)
        seq = Sequence(-1, list(token_ids), len(token_ids), SamplingParams(max_tokens=1), self.max_model_len)
        if not self.block_manager.ensure(seq, len(token_ids)):
            raise ValueError(f"{len(token_ids)} tokens do not fit in the free KV cache")
        try:
            while seq.num_cached_tokens < seq.num_tokens:
                n = min(seq.num_tokens - seq.num_cached_tokens, self.config.max_num_batched_tokens)
                logits = self.runner.run([seq], [n], all_logits=True)
                seq.num_cached_tokens += n
                yield logits
        finally:
            self.block_manager.release(seq)
