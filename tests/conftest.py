import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run through Triton's interpreter; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

import fixtures  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> folder of a tiny HF checkpoint (built once per session)."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = fixtures.write_checkpoint(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get
