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
    enable_prefix_caching: bool = True    # reuse cached pages of identical prompt prefixes
    seed: int = 0                         # seed for requests that give none
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
        if self.attn_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"unknown attn_backend {self.attn_backend!r}; choose auto, torch or triton")
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
