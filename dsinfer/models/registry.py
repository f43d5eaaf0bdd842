"""Which model class and which arguments class run which `model_type`."""

from __future__ import annotations

from .args import SUPPORTED_MODEL_TYPES, ModelArgs
from .args_v4 import ModelArgsV4
from .deepseek_v3 import Transformer
from .deepseek_v4 import Transformer as TransformerV4

_MODELS = {"deepseek_v2": Transformer, "deepseek_v3": Transformer, "deepseek_v4": TransformerV4}
_ARGS = {"deepseek_v2": ModelArgs, "deepseek_v3": ModelArgs, "deepseek_v4": ModelArgsV4}
assert set(_MODELS) == set(_ARGS) == {*SUPPORTED_MODEL_TYPES, "deepseek_v4"}


def model_class(args: ModelArgs | ModelArgsV4):
    if args.model_type not in _MODELS:
        raise ValueError(f"no model for model_type {args.model_type!r}; supported: {', '.join(_MODELS)}")
    return _MODELS[args.model_type]


def args_from_config(cfg: dict) -> ModelArgs | ModelArgsV4:
    """The model arguments of a parsed config.json, whichever family it belongs to."""
    return _ARGS.get(cfg.get("model_type"), ModelArgs).from_hf_config(cfg)
