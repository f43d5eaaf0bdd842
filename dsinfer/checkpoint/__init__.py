"""Checkpoints: reading Hugging Face safetensors, the name table, casting (FP8 <-> BF16), tensor-parallel
conversion and sizing."""

from .cast import cast_checkpoint
from .convert import convert_checkpoint
from .loader import checkpoint_files, checkpoint_tensors, load_model, load_weights, read_config, read_headers
from .names import hf_to_native, native_to_hf
from .sizing import format_sizing, inspect_checkpoint

__all__ = ["cast_checkpoint", "checkpoint_files", "checkpoint_tensors", "convert_checkpoint", "format_sizing",
           "hf_to_native", "inspect_checkpoint", "load_model", "load_weights", "native_to_hf", "read_config",
           "read_headers"]
