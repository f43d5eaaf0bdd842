"""Files that ship inside the package: the bundled Shakespeare model and its evaluation text."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent
BUNDLED_MODEL = ASSETS / "shakespeare-v3"
HAMLET = ASSETS / "eval" / "hamlet.txt"


def default_model_path() -> Path:
    """The bundled model, used when no --model is given."""
    if not (BUNDLED_MODEL / "config.json").is_file():
        raise ValueError(f"the bundled model is missing from {BUNDLED_MODEL}; pass --model PATH")
    return BUNDLED_MODEL
