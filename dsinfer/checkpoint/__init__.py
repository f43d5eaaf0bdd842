"""Checkpoints: reading Hugging Face safetensors, the name table, and (later) casting and sharding."""

from .loader import checkpoint_files, load_model, load_weights, read_config, read_headers
from .names import hf_to_native, native_to_hf

__all__ = ["checkpoint_files", "load_model", "load_weights", "read_config", "read_headers", "hf_to_native",
           "native_to_hf"]
