"""Tensor and expert parallelism on the CPU (gloo): 2 ranks give the same greedy tokens and, within float32
tolerance, the same logits as 1 rank (the oracle: the one-process engine, itself tested against HF transformers)
for the bundled model, tiny V2-Lite- and V3-like checkpoints, a `convert --tp 2` folder and an FP8 checkpoint;
through the Python API (rank 0 in this process, one worker started by it) and under torchrun. Bad sizes are
refused before any process starts."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fixtures
import pytest
import torch

from dsinfer import LLM, EngineConfig, SamplingParams
from dsinfer.assets import default_model_path
from dsinfer.checkpoint import convert_checkpoint
from dsinfer.parallel import ParallelState

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = ["ROMEO:", "To be, or not to be", "The quick brown fox jumps"]
MAX_LEN = 128


def score_ids(vocab: int, n: int = 40) -> list[int]:
    g = torch.Generator().manual_seed(3)
    return [0] + torch.randint(7, vocab, (n - 1,), generator=g).tolist()


MODELS = ["bundled", "v2-lite", "v3", "v3-converted", "v3-wide-fp8"]


@pytest.fixture(scope="module", params=MODELS)
def pair(request, checkpoint, tmp_path_factory):
    """(1-rank results, 2-rank results) for one model: greedy outputs and logits of a scored sequence."""
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    if name == "bundled":
        path = default_model_path()
    elif name == "v3-converted":
        path = convert_checkpoint(checkpoint("v3"), tmp / "tp2", 2, progress=False)
    elif name == "v3-wide-fp8":
        path = fixtures.write_fp8_wide(tmp)     # FP8 weights, float32 activations
    else:
        path = checkpoint(name)
    results = []
    for tp in (1, 2):
        llm = LLM(path, device="cpu", dtype="float32", max_model_len=MAX_LEN, progress=False, tensor_parallel_size=tp)
        try:
            outs = llm.generate(PROMPTS, GREEDY)
            logits = llm.logits(score_ids(llm.engine.args.vocab_size))
            results.append(([o.token_ids for o in outs], logits, llm.engine.cache.num_pages))
        finally:
            llm.shutdown()
    return name, results


def test_two_ranks_match_one(pair):
    _, ((tokens1, logits1, pages1), (tokens2, logits2, pages2)) = pair
    assert tokens2 == tokens1
    assert logits2.shape == logits1.shape == (40, logits1.shape[1])
    torch.testing.assert_close(logits2, logits1, rtol=1e-4, atol=1e-4)
    assert pages2 == pages1


def test_engine_knows_its_rank():
    llm = LLM(device="cpu", dtype="float32", max_model_len=MAX_LEN, progress=False, tensor_parallel_size=2)
    try:
        p = llm.engine.parallel
        assert (p.rank, p.world_size, p.is_driver) == (0, 2, True)
        assert llm.engine.model.layers[0].attn.n_heads == 4                    # 8 heads, half here
        with pytest.raises(ValueError, match="already running in this process"):
            LLM(device="cpu", dtype="float32", progress=False, tensor_parallel_size=2)
    finally:
        llm.shutdown()
    llm.shutdown()                                                              # idempotent
    assert llm.engine.parallel.closed


def test_releases_run_before_the_group_is_left_on_a_clean_stop_only():
    """CUDA graphs that captured NCCL collectives must be freed before NCCL's teardown (which waits for them)."""
    order = []
    worker = ParallelState(rank=1, world_size=2)          # a worker's shutdown sends nothing
    worker.before_leaving.append(lambda: order.append("release"))
    worker.on_shutdown = lambda graceful: order.append(f"leave graceful={graceful}")
    worker.shutdown()
    worker.shutdown()                                     # once
    assert order == ["release", "leave graceful=True"]
    order.clear()
    failed = ParallelState(rank=0, world_size=2)
    failed.before_leaving.append(lambda: order.append("release"))
    failed.on_shutdown = lambda graceful: order.append(f"leave graceful={graceful}")
    failed.abort()                                        # a peer may be inside a collective: nothing waits
    assert order == ["leave graceful=False"]


def test_single_state_has_no_collectives():
    p = ParallelState.single()
    x = torch.randn(3, 4)
    assert p.all_reduce(x) is x and p.all_gather(x, -1) is x
    assert p.broadcast_object({"a": 1}) == {"a": 1} and p.agree_min(7) == 7 and p.all_gather_object(5) == [5]
    assert p.split(8, "heads") == 8
    with pytest.raises(ValueError, match="does not divide heads = 8"):
        ParallelState(0, 3).split(8, "heads")
    with pytest.raises(KeyError):
        p.check_setup(KeyError("x"))


@pytest.mark.parametrize("kwargs, message", [
    ({"tensor_parallel_size": 0}, "tensor_parallel_size must be a positive integer"),
    ({"tensor_parallel_size": 2.0}, "tensor_parallel_size must be a positive integer"),
])
def test_config_refuses_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


@pytest.mark.parametrize("tp, message", [(3, "--tp 3 does not divide num_attention_heads = 8"),
                                         (16, "--tp 16 does not divide num_attention_heads = 8")])
def test_sizes_that_do_not_divide_are_refused_before_starting(tp, message):
    with pytest.raises(ValueError, match=message):
        LLM(device="cpu", progress=False, tensor_parallel_size=tp)
    assert not torch.distributed.is_initialized()


def test_torchrun(tmp_path):
    """Both ranks started by torchrun: rank 0 prints the completion, rank 1 serves it and prints nothing."""
    oracle = LLM(device="cpu", dtype="float32", max_model_len=MAX_LEN, progress=False)
    want = "ROMEO:" + oracle.generate("ROMEO:", SamplingParams(temperature=0, max_tokens=10))[0].text + "\n"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "-m", "dsinfer", "generate",
                        "--device", "cpu", "--dtype", "float32", "--max-model-len", str(MAX_LEN), "--tp", "2",
                        "--temperature", "0", "--max-new-tokens", "10", "--prompt", "ROMEO:"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker through /proc (Linux)")
def test_a_worker_that_dies_mid_generation_stops_rank_0(tmp_path):
    """Kill the worker while rank 0 (a Python program using LLM) generates: rank 0 exits with status 1 and one
    line naming the worker, instead of waiting in a collective."""
    script = tmp_path / "long.py"
    script.write_text("from dsinfer import LLM, SamplingParams\n"
                      "llm = LLM(device='cpu', dtype='float32', max_model_len=1024, progress=False, "
                      "tensor_parallel_size=2)\n"
                      "print('generating', flush=True)\n"
                      "llm.generate(['ROMEO:'] * 4, SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        assert proc.stdout.readline() == "generating\n"
        worker = _child(proc.pid)
        time.sleep(1)
        os.kill(worker, signal.SIGKILL)
        assert proc.wait(60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = proc.stderr.read().strip().splitlines()
    want = f"dsinfer: error: tensor-parallel worker rank 1 (pid {worker}) was killed by signal 9; stopping all ranks"
    assert lines == [want]


def _child(pid: int) -> int:
    kids = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    assert len(kids) == 1
    return kids[0]
