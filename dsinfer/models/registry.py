"""Which model class runs which `model_type`."""

from __future__ import annotations

from .args import SUPPORTED_MODEL_TYPES, ModelArgs
from .deepseek_v3 import Transformer

_MODELS = {"deepseek_v2": Transformer, "deepseek_v3": Transformer}
assert set(_MODELS) == set(SUPPORTED_MODEL_TYPES)


def model_class(args: ModelArgs):
    if args.model_type not in _MODELS:
        raise ValueError(f"no model for model_type {args.model_type!r}; supported: {', '.join(_MODELS)}")
    return _MODELS[args.model_type]
