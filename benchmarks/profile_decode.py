"""Where a decode step's GPU time goes: a random-weight model of a named shape, a few eager decode steps under
the PyTorch profiler, and the kernels ranked by total time (with launches per step).

    python benchmarks/profile_decode.py --config v2-lite --batch 1
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dsinfer.bench import bench_config, random_model, random_model_v4
from dsinfer.config import EngineConfig
from dsinfer.engine import Engine
from dsinfer.models import ModelArgs
from dsinfer.models.args_v4 import ModelArgsV4
from dsinfer.sampling import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="v2-lite")
    p.add_argument("--layers", type=int)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--max-model-len", type=int, help="default: the model's, as `dsinfer bench` runs it")
    p.add_argument("--graphs", action="store_true", help="replay CUDA graphs as the engine does by default "
                   "(kernel names inside graphs are still listed)")
    a = p.parse_args()
    cfg = bench_config(a.config, a.layers)
    v4 = cfg.get("model_type") == "deepseek_v4"
    args = ModelArgsV4.from_hf_config(cfg) if v4 else ModelArgs.from_hf_config(cfg)
    config = EngineConfig(max_model_len=a.max_model_len, max_num_seqs=a.batch, enable_prefix_caching=False,
                          enforce_eager=not a.graphs, progress=False)
    build = random_model_v4 if v4 else random_model
    engine = Engine.from_model(build(args, config.torch_dtype, config.torch_device), args, config)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=2 * a.steps + 8)
    for _ in range(a.batch):
        engine.add_request(list(range(1, 65)), params)
    for _ in range(4):
        engine.step()                                     # prefill and warm decode steps
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(a.steps):
        engine.step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / a.steps * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            engine.step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time_total for e in events)
    launches = sum(e.count for e in events)
    print(f"{a.config} batch {a.batch} ({'graphs' if a.graphs else 'eager'}): {wall_ms:.2f} ms per step "
          f"(wall, unprofiled), {total / a.steps / 1e3:.2f} ms of kernels per step, {launches / a.steps:.0f} "
          "launches per step")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:a.top]:
        print(f"{e.device_time_total / a.steps:9.1f} us {e.count / a.steps:6.0f}x  {e.key[:100]}")


if __name__ == "__main__":
    main()
