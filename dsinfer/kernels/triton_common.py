"""What the Triton kernel files share: the interpreter switch, argument checks and the autotune M bucket.

Triton is imported only by the kernel files (lazily, through `dsinfer.kernels.__getattr__`), so `import dsinfer`
works where Triton is not installed.
"""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1; @triton.jit reads it at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def m_bucket(m: int) -> int:
    """The autotune key for the row count: powers of two from 16 to 1024, so new batch sizes rarely retune."""
    return min(max(16, 1 << (m - 1).bit_length()), 1024)


def check_tensor(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], dim: int | None = None) -> None:
    """Raise TypeError/ValueError unless `t` is a contiguous tensor of one of `dtypes` (and `dim` dimensions)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must be {allowed}; got {str(t.dtype).removeprefix('torch.')}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous()); got strides {t.stride()}")


def check_device(**tensors: torch.Tensor) -> None:
    """Raise ValueError unless all tensors share one device, and it is CUDA (or CPU under the interpreter)."""
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError("tensors on different devices: " + ", ".join(f"{k} on {v.device}" for k, v in tensors.items()))
    device = devices.pop()
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"Triton kernels need CUDA tensors, got {device} (set TRITON_INTERPRET=1 to run them on "
                         "CPU for testing)")


def quick_bench(fn, quantiles):
    """Autotune timing: short runs (5 ms warm-up, 20 ms of repeats) keep first-call tuning to seconds."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)
