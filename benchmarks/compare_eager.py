"""Correctness at scale: greedy tokens of the fast path (CUDA graphs, Triton kernels, cuBLAS FP8) against the
plain eager path (no graphs, torch twins for attention, MoE and FP8 linears) on the same random weights.

    python benchmarks/compare_eager.py --config v3 --tp 8 --prompts 8 --max-tokens 32
    python benchmarks/compare_eager.py --config v3 --layers 4 --device cpu --tp 2      # a smoke run on CPU

Both engines are built with `Engine.from_random` from the same seed, one after the other (each rank draws the same
numbers both times), and fed the same prompts of mixed lengths at once. For every request it prints whether the
tokens agree and, where they part, the step and the fast path's margin between its first and second choice
there (random weights give near-ties that rounding order can flip). Exit status 1 if any request differs, or if
the two paths' log-probabilities of the shared prefix differ by more than --logprob-tol.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsinfer.bench import bench_config  # noqa: E402
from dsinfer.config import EngineConfig  # noqa: E402
from dsinfer.engine import Engine  # noqa: E402
from dsinfer.sampling import SamplingParams  # noqa: E402


def run(cfg: dict, config: EngineConfig, prompts: list[list[int]], max_tokens: int):
    """Greedy tokens and (token logprob, margin to the runner-up) per step for every prompt, all in flight."""
    t0 = time.perf_counter()
    engine = Engine.from_random(cfg, config)
    built = time.perf_counter() - t0
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens, logprobs=2)
    ids = [engine.add_request(p, params) for p in prompts]
    steps = {i: [] for i in ids}
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            top = out.logprobs.top
            steps[out.seq_id].append((out.new_token_ids[0], out.logprobs.logprob, top[0][1] - top[1][1]))
    ran = time.perf_counter() - t0
    engine.shutdown()
    print(f"  built in {built:.1f} s, generated in {ran:.1f} s", flush=True)
    return [steps[i] for i in ids]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="v3", help="v2-lite, v3, or a config.json path (default v3)")
    p.add_argument("--layers", type=int, help="keep only the first N layers")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--prompts", type=int, default=8, help="requests, of lengths spread over 8..--max-prompt-len")
    p.add_argument("--max-prompt-len", type=int, default=300)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--logprob-tol", type=float, default=0.1,
                   help="largest allowed |logprob difference| of a token both paths chose (default 0.1)")
    args = p.parse_args(argv)
    cfg = bench_config(args.config, args.layers)
    g = torch.Generator().manual_seed(0)
    lengths = torch.linspace(8, args.max_prompt_len, args.prompts).long().tolist()
    prompts = [torch.randint(0, cfg["vocab_size"], (n,), generator=g).tolist() for n in lengths]
    common = dict(device=args.device, max_model_len=args.max_prompt_len + args.max_tokens + 8,
                  max_num_seqs=max(args.prompts, 1), enable_prefix_caching=False, progress=False,
                  tensor_parallel_size=args.tp)
    print(f"fast path (CUDA graphs where on GPU, Triton/cuBLAS kernels), tp {args.tp}:", flush=True)
    fast = run(cfg, EngineConfig(**common), prompts, args.max_tokens)
    print("eager path (no graphs, torch attention, per-expert MoE loop, FP8 dequantized per call):", flush=True)
    eager = run(cfg, EngineConfig(**common, enforce_eager=True, attn_backend="torch", moe_backend="torch",
                                  fp8_impl="torch"), prompts, args.max_tokens)
    same, worst = 0, 0.0
    for i, (n, a, b) in enumerate(zip(lengths, fast, eager)):
        ta, tb = [s[0] for s in a], [s[0] for s in b]
        k = next((j for j, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))
        diff = max((abs(a[j][1] - b[j][1]) for j in range(k)), default=0.0)
        worst = max(worst, diff)
        if ta == tb:
            same += 1
            print(f"request {i} ({n}-token prompt): {len(ta)} tokens identical; max |dlogprob| {diff:.2e}")
        else:
            print(f"request {i} ({n}-token prompt): differs at step {k} (fast {ta[k]}, eager {tb[k]}); fast "
                  f"path's top-2 margin there {a[k][2]:.3f} nats, eager's {b[k][2]:.3f}; before it max |dlogprob| "
                  f"{diff:.2e}")
    print(f"{same}/{len(prompts)} requests identical over {args.max_tokens} greedy tokens; largest |dlogprob| of a "
          f"shared token {worst:.2e} (tolerance {args.logprob_tol})")
    return 0 if same == len(prompts) and worst <= args.logprob_tol else 1


if __name__ == "__main__":
    sys.exit(main())
