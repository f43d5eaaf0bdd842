"""Starting the ranks of a tensor-parallel engine (EngineConfig.tensor_parallel_size = n > 1).

- On one machine (`dsinfer ... --tp n`, or `LLM(..., tensor_parallel_size=n)`): this process is rank 0. It hosts
  a TCP store on a free localhost port and starts n - 1 workers (`python -m dsinfer.launch`), one GPU
  each (NCCL) or on the CPU (gloo). A monitor thread watches them: a worker that exits takes the whole group
  down with one line on stderr (status 1), rather than leaving rank 0 waiting in a collective.
- Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set; --nnodes, --node-rank and the
  rendezvous are torchrun's): every rank joins torchrun's group. Rank 0 goes on to be the engine; the other
  ranks serve it and exit when it shuts down (torchrun itself stops the group when one rank dies).

Rank 0 then broadcasts what to build (`engine.worker.WorkerSpec`), so workers need no arguments of their own.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import EngineConfig
from .parallel import ParallelState

COLLECTIVE_TIMEOUT = timedelta(minutes=30)   # a model collective this late means a rank is stuck (NCCL aborts)
CONTROL_TIMEOUT = timedelta(days=3650)       # workers wait this long for rank 0's next step (an idle server)
STARTUP_TIMEOUT = timedelta(minutes=10)      # for every rank to reach the store
SETUP_FAILED = 3                             # a worker's status after a setup error that rank 0 reports itself
_ENV = "DSINFER_TP_"                         # variables rank 0 passes to the workers it starts


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def check_tensor_parallel(config: EngineConfig, hf_config: dict) -> None:
    """Refuse, before any process starts, a tensor-parallel size the model or the machine cannot take."""
    from .checkpoint.convert import check_tp
    from .models import ModelArgs
    n = config.tensor_parallel_size
    check_tp(ModelArgs.from_hf_config(hf_config), n, "--tp")
    if config.torch_device.type == "cuda" and not under_torchrun() and torch.cuda.device_count() < n:
        raise ValueError(f"--tp {n} needs {n} GPUs on this machine, found {torch.cuda.device_count()}; use torchrun "
                         "for several machines")


def start(spec) -> ParallelState:
    """This process's ParallelState as rank 0 of `spec.config.tensor_parallel_size` ranks (single for 1), with
    the other ranks started (or joined) and told `spec`. Under torchrun, ranks other than 0 serve rank 0 here
    and then exit."""
    config: EngineConfig = spec.config
    n = config.tensor_parallel_size
    if n == 1:
        return ParallelState.single(config.torch_device)
    from .checkpoint import read_config
    check_tensor_parallel(config, spec.random_config if spec.model_path is None else read_config(spec.model_path)[1])
    if dist.is_initialized():
        raise ValueError("a tensor-parallel engine is already running in this process; shut it down first "
                         "(LLM.shutdown() or Engine.shutdown())")
    if under_torchrun():
        parallel = _join_torchrun(config)
        if not parallel.is_driver:
            from .engine.worker import serve
            code = serve(parallel)
            parallel.shutdown()
            raise SystemExit(code)
    else:
        parallel = _spawn(config)
    atexit.register(parallel.shutdown)
    parallel.broadcast_object(spec)
    return parallel


def _device(config: EngineConfig, local_rank: int) -> torch.device:
    if config.torch_device.type != "cuda":
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}")
    return torch.device("cuda", local_rank)


def _init(device: torch.device, rank: int, world_size: int, local_rank: int, store=None) -> ParallelState:
    """Join the model group (NCCL on GPU, gloo on CPU) and the host-side control group (gloo)."""
    kwargs = {"rank": rank, "world_size": world_size, "timeout": COLLECTIVE_TIMEOUT}
    if store is not None:
        kwargs["store"] = store
    else:
        kwargs["init_method"] = "env://"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, **kwargs)
    else:
        dist.init_process_group("gloo", **kwargs)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return ParallelState(rank, world_size, device, group=dist.group.WORLD, control_group=control,
                         local_rank=local_rank)


def _destroy(graceful: bool = True) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _join_torchrun(config: EngineConfig) -> ParallelState:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if world_size != config.tensor_parallel_size:
        raise ValueError(f"--tp {config.tensor_parallel_size} does not match torchrun's WORLD_SIZE={world_size}")
    parallel = _init(_device(config, local_rank), rank, world_size, local_rank)
    parallel.on_shutdown = _destroy
    return parallel


# -- one machine: rank 0 starts the workers ---------------------------------------------------------------------

def _spawn(config: EngineConfig) -> ParallelState:
    n = config.tensor_parallel_size
    device = _device(config, 0)
    store = dist.TCPStore("127.0.0.1", 0, n, is_master=True, timeout=STARTUP_TIMEOUT, wait_for_workers=False)
    threads = torch.get_num_threads()
    if device.type == "cpu":       # n ranks share the cores; oversubscribed OpenMP threads spin and crawl
        torch.set_num_threads(max(1, threads // n))
    procs = []
    for rank in range(1, n):
        env = dict(os.environ, **{f"{_ENV}RANK": str(rank), f"{_ENV}WORLD_SIZE": str(n),
                                  f"{_ENV}PORT": str(store.port), f"{_ENV}DEVICE": device.type,
                                  f"{_ENV}PARENT": str(os.getpid())})
        if device.type == "cpu":
            env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
        # stdout to our stderr: a worker must never write into rank 0's output; own session: the terminal's
        # Ctrl-C goes to rank 0, which stops the workers.
        procs.append(subprocess.Popen([sys.executable, "-m", "dsinfer.launch"], env=env, stdout=2,
                                      stdin=subprocess.DEVNULL, start_new_session=True))
    workers = Workers(procs, threads)
    try:
        parallel = _init(device, 0, n, 0, store)
    except BaseException:
        workers.kill()
        torch.set_num_threads(threads)
        raise
    workers.watch(parallel)
    return parallel


def _join_spawned() -> ParallelState:
    """In a worker started by `_spawn`: join rank 0's group."""
    rank, world_size = int(os.environ[f"{_ENV}RANK"]), int(os.environ[f"{_ENV}WORLD_SIZE"])
    device = torch.device("cuda", rank) if os.environ[f"{_ENV}DEVICE"] == "cuda" else torch.device("cpu")
    store = dist.TCPStore("127.0.0.1", int(os.environ[f"{_ENV}PORT"]), world_size, is_master=False,
                          timeout=STARTUP_TIMEOUT)
    parallel = _init(device, rank, world_size, rank, store)
    parallel.on_shutdown = _destroy
    return parallel


def _watch_parent() -> None:
    """In a worker started by `_spawn`: exit when rank 0's process is gone (it may die without a word)."""
    parent = int(os.environ[f"{_ENV}PARENT"])

    def loop():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=loop, name="dsinfer-parent-watch", daemon=True).start()


def worker_main() -> int:
    """`python -m dsinfer.launch`: a worker that rank 0 started on this machine."""
    from .engine.worker import serve
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # rank 0 decides when the group stops
    _watch_parent()
    parallel = _join_spawned()
    code = serve(parallel)
    if code == 0:
        parallel.shutdown()
    return code


class Workers:
    """The worker processes rank 0 started, and the thread that watches them."""

    def __init__(self, procs: list[subprocess.Popen], threads: int):
        self.procs, self.threads = procs, threads          # rank 0's CPU threads before the group, restored after
        self.parallel: ParallelState | None = None

    def watch(self, parallel: ParallelState) -> None:
        self.parallel = parallel
        parallel.on_failure = self._on_collective_failure
        parallel.on_shutdown = self._join
        threading.Thread(target=self._monitor, name="dsinfer-tp-monitor", daemon=True).start()

    def _dead(self) -> tuple[int, subprocess.Popen] | None:
        for rank, p in enumerate(self.procs, start=1):
            code = p.poll()
            if code is not None and code != SETUP_FAILED and not (code == 0 and self.parallel.closed):
                return rank, p
        return None

    def _monitor(self) -> None:
        while not (self.parallel.closed and all(p.poll() is not None for p in self.procs)):
            dead = self._dead()
            if dead is not None and not self.parallel.closed:
                self._fatal(*dead)
            time.sleep(0.2)

    def _on_collective_failure(self, error: BaseException) -> None:
        deadline = time.monotonic() + 5            # a peer's socket closes before its process is reaped
        while time.monotonic() < deadline:
            dead = self._dead()
            if dead is not None:
                self._fatal(*dead)
            time.sleep(0.1)
        self.kill()

    def _fatal(self, rank: int, proc: subprocess.Popen) -> None:
        code = proc.returncode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        print(f"dsinfer: error: tensor-parallel worker rank {rank} (pid {proc.pid}) {how}; stopping all ranks",
              file=sys.stderr, flush=True)
        self.kill()
        os._exit(1)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def _join(self, graceful: bool) -> None:
        """After a normal stop: leave the group together with the workers (NCCL's teardown is collective: a rank
        that tears down after its peers have gone waits forever), then wait for them (a while). After an error:
        stop them at once, then leave."""
        if graceful:
            _destroy()
        deadline = time.monotonic() + (30 if graceful else 0)
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        _destroy()
        torch.set_num_threads(self.threads)


if __name__ == "__main__":
    sys.exit(worker_main())
