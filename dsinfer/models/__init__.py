"""DeepSeek model definitions: arguments from config.json, layers, and the models themselves."""

from .args import ModelArgs, QuantArgs, RopeArgs
from .batch import AttentionMetadata
from .deepseek_v3 import Transformer
from .registry import model_class

__all__ = ["ModelArgs", "QuantArgs", "RopeArgs", "AttentionMetadata", "Transformer", "model_class"]
