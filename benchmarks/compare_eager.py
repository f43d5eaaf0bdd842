"""Correctness at scale: greedy tokens of the fast path (CUDA graphs, Triton kernels, cuBLAS FP8) against the plain
eager path (no graphs, torch twins for attention, MoE and FP8 linears) on the same random weights.

    python benchmarks/compare_eager.py --config v3 --tp 8 --prompts 8 --max-tokens 32
    python benchmarks/compare_eager.py --config v3 --layers 4 --device cpu --tp 2      # a smoke run on CPU

Each path runs in a process of its own (`--path fast|eager --save FILE`, started by the default `--path both`),
built with `Engine.from_random` from the same seed (each rank draws the same numbers both times) and fed the same
prompts of mixed lengths at once. A path that stalls prints every thread's stack every --stall-s seconds. For every
request it prints whether the tokens agree and, where they part, the step and the fast path's margin between its
first and second choice there (random weights give near-ties that rounding order can flip). Exit status 1 if any
request differs, or if the two paths' log-probabilities of the shared prefix differ by more than --logprob-tol."""

from __future__ import annotations

import argparse
import faulthandler
import json
import subprocess
import sys
import tempfile
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
    print(f"  built in {built:.1f} s", flush=True)
    ids = [engine.add_request(p, params) for p in prompts]
    steps = {i: [] for i in ids}
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            top = out.logprobs.top
            steps[out.seq_id].append((out.new_token_ids[0], out.logprobs.logprob, top[0][1] - top[1][1]))
    print(f"  generated in {time.perf_counter() - t0:.1f} s", flush=True)
    engine.shutdown()
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
    p.add_argument("--path", default="both", choices=["both", "fast", "eager"])
    p.add_argument("--save", help="with --path fast|eager: write the steps to this JSON file")
    p.add_argument("--stall-s", type=float, default=120.0, help="print all stacks if a path runs this long")
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
    if args.path != "both":
        faulthandler.dump_traceback_later(args.stall_s, repeat=True)
        config = EngineConfig(**common) if args.path == "fast" else EngineConfig(
            **common, enforce_eager=True, attn_backend="torch", moe_backend="torch", fp8_impl="torch")
        Path(args.save).write_text(json.dumps(run(cfg, config, prompts, args.max_tokens)))
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path, what in (("fast", "CUDA graphs where on GPU, Triton/cuBLAS kernels"),
                           ("eager", "no graphs, torch attention, per-expert MoE loop, FP8 dequantized per call")):
            print(f"{path} path ({what}), tp {args.tp}:", flush=True)
            save = Path(tmp) / f"{path}.json"
            argv_path = list(argv if argv is not None else sys.argv[1:])
            code = subprocess.call([sys.executable, __file__, *argv_path, "--path", path, "--save", str(save)])
            if code != 0:
                print(f"the {path} path failed (status {code})")
                return 1
            results[path] = json.loads(save.read_text())
    return 0 if compare(lengths, results["fast"], results["eager"], args.logprob_tol) else 1


def compare(lengths: list[int], fast: list, eager: list, logprob_tol: float, out=print) -> bool:
    """Print a line per request and a summary; True when every request's tokens agree and the log-probabilities
    of the tokens both paths chose differ by at most logprob_tol. fast/eager: per request, per step
    (token, logprob, top-2 margin)."""
    same, worst = 0, 0.0
    for i, (n, a, b) in enumerate(zip(lengths, fast, eager)):
        ta, tb = [s[0] for s in a], [s[0] for s in b]
        k = next((j for j, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
        diff = max((abs(a[j][1] - b[j][1]) for j in range(k)), default=0.0)
        worst = max(worst, diff)
        if ta == tb:
            same += 1
            out(f"request {i} ({n}-token prompt): {len(ta)} tokens identical; max |dlogprob| {diff:.2e}")
        elif k < min(len(ta), len(tb)):
            out(f"request {i} ({n}-token prompt): differs at step {k} (fast {ta[k]}, eager {tb[k]}); fast path's "
                f"top-2 margin there {a[k][2]:.3f} nats, eager's {b[k][2]:.3f}; before it max |dlogprob| {diff:.2e}")
        else:
            out(f"request {i} ({n}-token prompt): {len(ta)} fast tokens, {len(tb)} eager")
    out(f"{same}/{len(lengths)} requests identical; largest |dlogprob| of a shared token {worst:.2e} "
        f"(tolerance {logprob_tol})")
    return same == len(lengths) and worst <= logprob_tol

if __name__ == "__main__":
    sys.exit(main())
