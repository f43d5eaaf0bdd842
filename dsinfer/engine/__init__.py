"""The serving engine: sequences, the paged latent cache, the scheduler and the model runner."""

from .engine import Engine, StepOutput
from .sequence import Sequence, SequenceStatus

__all__ = ["Engine", "StepOutput", "Sequence", "SequenceStatus"]
