"""dsinfer: an inference engine for the DeepSeek model family."""

from .config import EngineConfig
from .llm import LLM, RequestOutput
from .sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "RequestOutput", "SamplingParams", "EngineConfig"]
