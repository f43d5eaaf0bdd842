"""Parallel state: which slice of the model this process runs, and the collectives between the slices.

Tensor parallelism (attention heads, dense and shared-expert widths, the vocabulary) and expert parallelism
(routed experts divided between ranks) enter the model only through layer classes that take a `ParallelState`
and through the loader; the model code reads the same for one process or many. One process is
`ParallelState.single()`: no groups, every collective the identity.

Two process groups: `group` carries the model's collectives (NCCL on GPU, gloo on CPU); `control_group` (always
gloo, on the host) carries rank 0's messages to the other ranks (each step's batch, setup results), so that a
worker waiting for the next step blocks on a socket, not on a GPU stream. A collective that fails (a peer died)
is fatal: the process reports one line and exits, because the other ranks cannot continue without it.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist

# torch 2.13 renamed all_gather_into_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class ParallelState:
    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu", group=None,
                 control_group=None, local_rank: int = 0):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = torch.device(device)
        self.group, self.control_group = group, control_group
        # Called with the exception when a collective fails; set by the launcher (e.g. to name a dead worker).
        self.on_failure: Callable[[BaseException], None] | None = None
        # Called once by shutdown() (graceful=True: the workers were told to stop, wait for them) or abort()
        # (graceful=False: stop them); set by the launcher, which also leaves the process groups there.
        self.on_shutdown: Callable[[bool], None] | None = None
        # Called before the groups are left: NCCL's teardown waits forever for CUDA graphs that captured its
        # collectives and are still alive, so their owners release them here.
        self.before_leaving: list[Callable[[], None]] = []
        self.closed = world_size == 1

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> ParallelState:
        """One process, no collectives."""
        return cls(device=device)

    @property
    def is_driver(self) -> bool:
        """Rank 0 owns the scheduler, the tokenizer and the server."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"ParallelState(rank={self.rank}, world_size={self.world_size}, device={self.device})"

    def split(self, size: int, what: str) -> int:
        """This rank's share of `size` (heads, a width, the vocabulary, experts); ValueError if it does not divide."""
        if size % self.world_size:
            raise ValueError(f"tensor-parallel size {self.world_size} does not divide {what} = {size}")
        return size // self.world_size

    # -- model collectives (group) ---------------------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place; returns x."""
        if self.world_size > 1:
            self._guard(dist.all_reduce, x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's x along `dim` (rank order)."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        out = torch.empty((self.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        self._guard(_all_gather_single, out, x, group=self.group)
        return torch.cat(out.view(self.world_size, *x.shape).unbind(0), dim=dim % x.dim())

    # -- host messages (control_group) ------------------------------------------------------------------------

    def broadcast_object(self, obj=None):
        """Rank 0's `obj` on every rank (the argument is ignored elsewhere)."""
        if self.world_size == 1:
            return obj
        if self.is_driver:
            data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        self._guard(dist.broadcast, size, src=0, group=self.control_group)
        if not self.is_driver:
            data = torch.empty(int(size), dtype=torch.uint8)
        self._guard(dist.broadcast, data, src=0, group=self.control_group)
        return obj if self.is_driver else pickle.loads(data.numpy().tobytes())

    def all_gather_object(self, obj) -> list:
        """Every rank's `obj`, in rank order."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        self._guard(dist.all_gather_object, out, obj, group=self.control_group)
        return out

    def agree_min(self, n: int) -> int:
        """The smallest `n` over the ranks (e.g. KV-cache pages, so that every rank allocates the same)."""
        if self.world_size == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64)
        self._guard(dist.all_reduce, t, op=dist.ReduceOp.MIN, group=self.control_group)
        return int(t)

    def check_setup(self, error: BaseException | None) -> None:
        """Every rank says whether it built its part of the model; if any failed, raise on every rank (rank 0
        re-raises its own error, or the first rank's as ValueError/RuntimeError)."""
        if self.world_size == 1:
            if error is not None:
                raise error
            return
        report = None if error is None else (type(error).__name__, str(error))
        reports = self.all_gather_object(report)
        failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
        if not failed:
            return
        self.closed = True                  # every rank knows: the workers leave on their own
        if error is not None:
            raise error
        r, (kind, message) = failed[0]
        raise (ValueError if kind in ("ValueError", "TypeError", "OSError") else RuntimeError)(
            message if kind in ("ValueError", "TypeError", "OSError") else f"rank {r}: {kind}: {message}")

    def shutdown(self) -> None:
        """Rank 0: tell the other ranks to stop and wait for them; every rank: leave the groups. Idempotent."""
        if not self.closed and self.is_driver:
            self.closed = True
            self.broadcast_object(None)
        self._close(graceful=True)

    def abort(self) -> None:
        """Rank 0 after an error of its own: the other ranks may be inside any collective, so they are stopped
        rather than told."""
        self._close(graceful=False)

    def _close(self, graceful: bool) -> None:
        self.closed = True
        release, self.before_leaving = self.before_leaving, []
        for fn in release if graceful else ():     # after an error a peer may hold a collective: no waiting
            fn()
        hook, self.on_shutdown = self.on_shutdown, None
        if hook is not None:
            hook(graceful)

    def _guard(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 -- a peer died or timed out: nothing this rank computes is useful now
            if self.on_failure is not None:
                self.on_failure(e)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"dsinfer: error: tensor-parallel rank {self.rank} lost its group ({first}); stopping",
                  file=sys.stderr, flush=True)
            os._exit(1)
