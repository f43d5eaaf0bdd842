"""EngineConfig: the runtime knobs (model arguments come from the checkpoint, sampling from SamplingParams)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class EngineConfig:
    device: str = "auto"                  # "auto" (cuda if available), "cpu", "cuda" or "cuda:N"
    dtype: str = "bfloat16"               # activations and non-quantized weights: bfloat16, float32, float16
    max_model_len: int | None = None      # longest prompt + generation; None = the model's max_position_embeddings
    page_size: int = 64                   # tokens per KV-cache page, 1..1024
    max_num_seqs: int = 64                # sequences decoded together, >= 1
    max_num_batched_tokens: int = 4096    # tokens per forward pass (prefill chunk size), >= 1
    gpu_memory_utilization: float = 0.90  # fraction of GPU memory dsinfer may use (weights + cache), in (0, 1]
    cpu_cache_gib: float = 1.0            # KV-cache budget on CPU, GiB, > 0
    attn_impl: str = "absorb"             # "absorb" (weight-absorbed MLA) or "naive" (expanded keys/values; oracle)
    fp8_impl: str = "auto"                # FP8 linear layers: see models.layers.FP8_IMPLS
    attn_backend: str = "auto"            # MLA attention + cache write: "auto" (triton on GPU), "torch", "triton"
    moe_backend: str = "auto"             # routed experts: "auto" (fused Triton kernel on GPU), "torch", "triton"
    enforce_eager: bool = False           # no CUDA graphs: run every decode step eagerly
    # Launch each step before reading the previous step's tokens back, so the host's bookkeeping overlaps the
    # GPU's work (engine.py). None = on for one CUDA device; True also runs it elsewhere (CPU: for testing).
    # Not under tensor parallelism yet.
    async_scheduling: bool | None = None
    cuda_graph_max_batch: int = 256       # decode batches up to this size replay graphs, >= 1 (<= max_num_seqs)
    # reuse cached pages of identical prompt prefixes; None = wherever the model allows it (not DeepSeek-V4)
    enable_prefix_caching: bool | None = None
    seed: int = 0                         # seed for requests that give none
    # Processes (one per GPU) the model is split over, >= 1: attention heads, dense and shared-expert widths and
    # the vocabulary are cut into this many slices and the routed experts divided; it must divide each of them.
    # More than 1 starts the other ranks on this machine, or joins torchrun's group (see launch.py).
    tensor_parallel_size: int = 1
    progress: bool = True                 # show a progress bar while loading weights

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"unknown device {self.device!r}; choose auto, cpu, cuda or cuda:N")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} was asked for but no CUDA GPU is available; use --device cpu")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if not 1 <= self.page_size <= 1024:
            raise ValueError(f"page_size must be in [1, 1024], got {self.page_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.cpu_cache_gib <= 0:
            raise ValueError(f"cpu_cache_gib must be positive, got {self.cpu_cache_gib}")
        if self.attn_impl not in ("absorb", "naive"):
            raise ValueError(f"unknown attn_impl {self.attn_impl!r}; choose absorb or naive")
        for name in ("attn_backend", "moe_backend"):
            if getattr(self, name) not in ("auto", "torch", "triton"):
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose auto, torch or triton")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}")
        if self.tensor_parallel_size > 1 and self.device.startswith("cuda:"):
            raise ValueError(f"device {self.device!r} names one GPU, but tensor_parallel_size "
                             f"{self.tensor_parallel_size} uses one GPU per rank (cuda:0, cuda:1, ...); use cuda")
        if self.cuda_graph_max_batch < 1:
            raise ValueError(f"cuda_graph_max_batch must be at least 1, got {self.cuda_graph_max_batch}")
        from .models.layers import FP8_IMPLS
        if self.fp8_impl not in FP8_IMPLS:
            raise ValueError(f"unknown fp8_impl {self.fp8_impl!r}; choose one of {', '.join(FP8_IMPLS)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
