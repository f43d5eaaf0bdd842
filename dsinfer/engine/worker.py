"""Ranks in lockstep under tensor parallelism.

Rank 0 owns the scheduler, the tokenizer and the server. Each step it builds the host-side `StepBatch`,
broadcasts it over the control group, and runs it; every other rank receives the same batch and runs it too
(`serve`), so the collectives inside the model line up and every rank's KV cache holds the same latents in the
same pages. Only rank 0 samples. A `None` batch means stop.

How the ranks are started is launch.py's business.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..config import EngineConfig
from ..parallel import ParallelState
from .kv_cache import KVCache
from .runner import ModelRunner, StepBatch


@dataclass(frozen=True)
class WorkerSpec:
    """What every rank builds: a checkpoint folder, or random weights with the shapes of an HF config."""

    config: EngineConfig
    model_path: str | None = None
    random_config: dict | None = None       # benchmarking: random weights (dsinfer bench, serve --random-weights)

    def build(self, parallel: ParallelState):
        """This rank's part of the model on its device, and the ModelArgs."""
        from ..checkpoint import load_model
        from ..models import ModelArgs
        c = self.config
        if self.random_config is not None:
            from ..bench import random_model
            args = ModelArgs.from_hf_config(self.random_config)
            return random_model(args, c.torch_dtype, parallel.device, parallel=parallel), args
        return load_model(self.model_path, c.torch_dtype, parallel.device, c.attn_impl,
                          c.progress and parallel.is_driver, parallel)


class LockstepRunner(ModelRunner):
    """Rank 0's runner under tensor parallelism: every batch it executes is first sent to the other ranks."""

    def __init__(self, model: torch.nn.Module, cache: KVCache, device: torch.device, parallel: ParallelState):
        super().__init__(model, cache, device)
        self.parallel = parallel

    def execute(self, batch: StepBatch, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        if batch.pending_pos:           # the other ranks would need those tokens too
            raise RuntimeError("async scheduling does not run under tensor parallelism")
        self.parallel.broadcast_object(batch)
        return super().execute(batch)


def serve(parallel: ParallelState) -> int:
    """A rank other than 0: build what rank 0 says, then run its batches until it says stop. Returns the exit
    status (launch.SETUP_FAILED when setting up failed on some rank: rank 0 reports it)."""
    from ..launch import SETUP_FAILED
    from .engine import Engine
    spec: WorkerSpec = parallel.broadcast_object()
    spec = dataclasses.replace(spec, config=dataclasses.replace(spec.config, progress=False))
    model = args = error = None
    try:
        model, args = spec.build(parallel)
    except Exception as e:  # noqa: BLE001 -- reported by rank 0, with every rank's
        error = e
    try:
        parallel.check_setup(error)
        engine = Engine.from_model(model, args, spec.config, parallel=parallel)
    except Exception:  # noqa: BLE001 -- rank 0 reports it
        return SETUP_FAILED
    while (batch := parallel.broadcast_object()) is not None:
        engine.runner.execute(batch)
    return 0
