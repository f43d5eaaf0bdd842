"""`dsinfer bench`: decode and prefill speed of a random-weight model with the exact shapes of a named config,
built on the device without a checkpoint, measured through the engine, against the memory-bandwidth limit.
DeepSeek-V4 (`--config v4-flash`) is built in its published formats (FP8 linears, FP4 routed experts) and timed
through the same engine (decode steps as CUDA graphs, as for V2/V3), on one device.

Weight bytes read per decode step are counted as spec/anchors.md counts them: every non-expert weight once
(attention, dense layers, shared experts, router, LM head, the embedding rows used), plus the routed experts the
batch touches: with uniform routing, a layer with E experts and top-k touches E * (1 - (1 - k/E)^batch) of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import EngineConfig
from .models import ModelArgs
from .models.args_v4 import ModelArgsV4
from .models.layers import Linear, RMSNorm
from .models.moe import Experts
from .models.published import PUBLISHED, V4_FLASH
from .models.v4_moe import Experts as ExpertsV4
from .parallel import ParallelState

NAMED_CONFIGS = {**PUBLISHED, "v4-flash": V4_FLASH}
# The linears DeepSeek ships in FP8 in V4 (spec section 3.4); the compressors, weights_proj and the head stay bf16.
_V4_FP8 = re.compile(r"\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)$|\.shared_experts\.w[123]$")


def bench_config(name_or_path: str, layers: int | None = None) -> dict:
    """A named config (v3, v2-lite, v4-flash) or a config.json path, optionally cut to `layers` layers."""
    if name_or_path in NAMED_CONFIGS:
        cfg = dict(NAMED_CONFIGS[name_or_path])
    else:
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"--config must be one of {', '.join(NAMED_CONFIGS)} or a config.json path, "
                             f"got {name_or_path!r}")
        cfg = json.loads(path.read_text())
    if layers is not None:
        if not 1 <= layers <= cfg["num_hidden_layers"]:
            raise ValueError(f"--layers must be in [1, {cfg['num_hidden_layers']}], got {layers}")
        cfg["num_hidden_layers"] = layers
        if cfg.get("model_type") != "deepseek_v4":       # V4: every layer is MoE; its schedules are per layer
            # a slice keeps one dense layer (if the model has any) and makes the rest MoE: V3 cut to 4 layers is
            # 1 dense + 3 MoE, the slice spec/anchors.md measures the reference on
            cfg["first_k_dense_replace"] = min(cfg.get("first_k_dense_replace", 0), 1)
    return cfg


@torch.no_grad()
def random_model(args: ModelArgs, dtype: torch.dtype, device: torch.device, seed: int = 0,
                 parallel: ParallelState | None = None) -> nn.Module:
    """The model for `args` with random weights made on `device` (FP8 + block scales where the config says so);
    under `parallel`, this rank's part. Every rank draws the same numbers in the same order, so weights that are
    whole on every rank (norms, router, latent projections) are equal across ranks, as their caches need."""
    from .checkpoint.loader import build_model
    g = torch.Generator(device).manual_seed(seed)
    model = build_model(args, dtype, parallel=parallel)
    block = args.quant.block_size if args.quant else None
    fp8_names = set()
    if block:
        for name, m in model.named_modules():
            if isinstance(m, Linear) and not name.endswith("head"):
                fp8_names.add(f"{name}.weight")
            elif isinstance(m, Experts):
                fp8_names.update(f"{name}.{w}" for w in ("w1", "w2", "w3"))
    for name, p in list(model.named_parameters()):
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if name in fp8_names:
            w = (torch.randn(p.shape, device=device, generator=g) * 0.02 / 0.004).clamp(-448, 448)
            scale_shape = (*p.shape[:-2], -(-p.shape[-2] // block[0]), -(-p.shape[-1] // block[1]))
            setattr(owner, attr, nn.Parameter(w.to(torch.float8_e4m3fn), requires_grad=False))
            scale_attr = "scale" if attr == "weight" else f"{attr}_scale"
            setattr(owner, scale_attr, nn.Parameter(torch.full(scale_shape, 0.004, device=device),
                                                    requires_grad=False))
        elif p.dtype == torch.float32 and attr in ("weight", "bias") and "norm" in owner_name:
            setattr(owner, attr, nn.Parameter(torch.ones(p.shape, device=device), requires_grad=False))
        else:
            std = 0.0 if attr == "bias" else 0.02
            t = torch.randn(p.shape, device=device, generator=g, dtype=torch.float32) * std
            setattr(owner, attr, nn.Parameter(t.to(p.dtype), requires_grad=False))
    return model.eval()


@torch.no_grad()
def random_model_v4(args: ModelArgsV4, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    """The DeepSeek-V4 model for `args` with random weights made on `device`, in the formats the loader keeps a
    published checkpoint in: when the config is quantized, FP8 e4m3 + 128x128 block scales (float32 powers of
    two) for the linears DeepSeek ships in FP8, and routed experts as packed FP4 (uint8, two e2m1 codes a byte)
    with one E8M0 scale byte per 32 inputs (FP8 stacks where expert_dtype says "fp8"); the rest as declared."""
    from .checkpoint.loader import _default_dtype
    from .models.deepseek_v4 import Transformer
    with torch.device("meta"), _default_dtype(dtype):
        model = Transformer(args)
    g = torch.Generator(device).manual_seed(seed)
    block = args.quant.block_size if args.quant else None
    fp8_names, fp4 = set(), block is not None and args.expert_dtype != "fp8"
    if block:
        for name, m in model.named_modules():
            if isinstance(m, Linear) and _V4_FP8.search(name):
                fp8_names.add(f"{name}.weight")
            elif isinstance(m, ExpertsV4):
                fp8_names.update(f"{name}.{w}" for w in ("w1", "w2", "w3"))

    def put(owner, attr, t):
        setattr(owner, attr, nn.Parameter(t, requires_grad=False))

    for name, p in list(model.named_parameters()):
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if name in fp8_names and fp4 and isinstance(owner, ExpertsV4):
            *lead, n, k = p.shape                   # codes uniform over all 16; scale 2^-7: |w| <= 0.047
            put(owner, attr, torch.randint(0, 256, (*lead, n, k // 2), device=device, generator=g,
                                           dtype=torch.uint8))
            put(owner, f"{attr}_scale", torch.full((*lead, n, k // 32), 120, dtype=torch.uint8, device=device))
        elif name in fp8_names:
            w = (torch.randn(p.shape, device=device, generator=g) * 0.02 * 256).clamp(-448, 448)
            scale_shape = (*p.shape[:-2], -(-p.shape[-2] // block[0]), -(-p.shape[-1] // block[1]))
            put(owner, attr, w.to(torch.float8_e4m3fn))
            put(owner, "scale" if attr == "weight" else f"{attr}_scale",
                torch.full(scale_shape, 2.0 ** -8, device=device))
        elif isinstance(owner, RMSNorm):
            put(owner, attr, torch.ones(p.shape, dtype=p.dtype, device=device))
        elif attr == "tid2eid":                     # k distinct experts per token, as in the release's table
            e, k = args.n_routed_experts, p.shape[1]
            base = torch.randint(0, e, (p.shape[0], 1), device=device, generator=g)
            put(owner, attr, ((base + torch.arange(k, device=device) * (e // k)) % e).to(p.dtype))
        else:
            std = 0.0 if attr == "bias" else 0.02
            t = torch.randn(p.shape, device=device, generator=g, dtype=torch.float32) * std
            put(owner, attr, t.to(p.dtype))
    return model.eval()


def weight_bytes_per_step(model: nn.Module, args: ModelArgs | ModelArgsV4, batch: int) -> int:
    """Bytes of weights a decode step of `batch` sequences reads (see the module docstring)."""
    total = 0
    for name, p in model.named_parameters():
        owner = model.get_submodule(name.rpartition(".")[0])
        if name == "embed.weight":
            total += min(batch, p.shape[0]) * p.shape[1] * p.element_size()
        elif isinstance(owner, (Experts, ExpertsV4)):
            e, k = args.n_routed_experts, args.n_activated_experts
            touched = e * (1 - (1 - k / e) ** batch)
            total += int(p.numel() * p.element_size() * touched / e)
        else:
            total += p.numel() * p.element_size()
    return total


def copy_bandwidth(device: torch.device) -> float | None:
    """Measured device-to-device copy bandwidth in bytes/s (read + write), or None on CPU."""
    if device.type != "cuda":
        return None
    x = torch.empty(2**29, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize(device)
    return 2 * x.numel() * 20 / (time.perf_counter() - t)


@dataclass
class BenchResult:
    batch: int
    decode_tokens_per_s: float
    step_ms: float
    weight_bytes: int
    bandwidth_fraction: float | None


def process_age() -> float:
    """Seconds since this process started (Linux /proc), so start-up costs before Python code are counted."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(cfg: dict, config: EngineConfig, batches: list[int], prompt_len: int, decode_steps: int,
              prefill_lens: list[int], out=print) -> list[BenchResult]:
    """Build a random model for `cfg`, then measure time to first token, prefill (one prompt of each length in
    `prefill_lens`) and decode; prints a report."""
    from .engine import Engine
    from .sampling import SamplingParams

    v4 = cfg.get("model_type") == "deepseek_v4"
    args = ModelArgsV4.from_hf_config(cfg) if v4 else ModelArgs.from_hf_config(cfg)
    device = config.torch_device
    t0 = time.perf_counter()
    if v4:                                           # the paged engine over random published-format weights
        if config.tensor_parallel_size > 1:
            raise ValueError("DeepSeek-V4 runs on one device; use --tp 1")
        config = dataclasses.replace(config, enable_prefix_caching=False)
        engine = Engine.from_model(random_model_v4(args, config.torch_dtype, device), args, config)
    else:
        engine = Engine.from_random(cfg, config)     # under tensor parallelism, every rank builds its part
    model, device = engine.model, engine.device
    _sync(device)
    build_s = time.perf_counter() - t0
    weights_gib = sum(t.numel() * t.element_size() for t in model.parameters()) / 2**30
    cache_gib = engine.cache.nbytes / 2**30
    total_gib = torch.cuda.mem_get_info(device)[1] / 2**30 if device.type == "cuda" else 0.0
    g = torch.Generator().manual_seed(0)

    def prompt(n):
        return torch.randint(0, args.vocab_size, (n,), generator=g).tolist()

    greedy = SamplingParams(temperature=0, ignore_eos=True, max_tokens=1)
    t0 = time.perf_counter()
    engine.add_request(prompt(prompt_len), greedy)
    while engine.has_unfinished():
        engine.step()
    ttft_warm = time.perf_counter() - t0                      # includes kernel compilation on first use
    first_token_age = process_age()
    t0 = time.perf_counter()
    engine.add_request(prompt(prompt_len), greedy)
    while engine.has_unfinished():
        engine.step()
    ttft = time.perf_counter() - t0

    engine.add_request(prompt(min(prefill_lens)), greedy)     # warm the prefill shapes (chunks of one size)
    while engine.has_unfinished():
        engine.step()
    prefill_tps = {}
    for n in prefill_lens:
        _sync(device)
        t0 = time.perf_counter()
        engine.add_request(prompt(n), greedy)
        while engine.has_unfinished():
            engine.step()
        prefill_tps[n] = n / (time.perf_counter() - t0)

    peak = copy_bandwidth(device)
    results = []
    for b in batches:
        params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=decode_steps + 3)
        ids = [engine.add_request(prompt(prompt_len), params) for _ in range(b)]
        while any(engine.sequences[i].num_cached_tokens < engine.sequences[i].num_tokens - 1 for i in ids) \
                or any(engine.sequences[i].num_generated < 2 for i in ids):
            engine.step()                                     # prefill everything, then one warm decode
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(decode_steps):
            engine.step()
        _sync(device)
        step_s = (time.perf_counter() - t0) / decode_steps
        for i in ids:
            engine.abort(i)
            engine.pop(i)
        nbytes = weight_bytes_per_step(model, args, b)
        frac = nbytes / step_s / peak if peak else None
        results.append(BenchResult(b, b / step_s, step_s * 1e3, nbytes, frac))

    name = (f"{cfg['model_type']}, {args.n_layers} layers, {args.n_routed_experts} experts "
            f"top-{args.n_activated_experts}")
    quant = "fp8 linears, fp4 experts" if v4 else "fp8 128x128" if args.quant else config.dtype
    n = engine.parallel.world_size
    ranks = f" x {n} ranks (tensor parallel; weight bytes per rank)" if n > 1 else ""
    out(f"model: {name}, weights {quant}, random; device {device}{ranks}; built in {build_s:.1f} s")
    out(f"time to first token ({prompt_len}-token prompt): {ttft * 1e3:.1f} ms "
        f"(first request, with kernel compilation: {ttft_warm * 1e3:.0f} ms); "
        f"process start to first token: {first_token_age:.1f} s")
    for n, tps in prefill_tps.items():
        out(f"prefill: {tps:,.0f} tokens/s ({n}-token prompt)")
    if device.type == "cuda":
        out(f"memory on {device}: weights {weights_gib:.1f} GiB, KV cache {cache_gib:.1f} GiB "
            f"({engine.cache.num_pages * config.page_size:,} tokens), peak allocated "
            f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB of {total_gib:.1f} GiB")
    if peak:
        out(f"copy bandwidth: {peak / 1e12:.2f} TB/s (read + write)")
    out("| batch | decode tokens/s | step (ms) | weight bytes / step | of copy bandwidth |")
    out("|---|---|---|---|---|")
    for r in results:
        frac = f"{100 * r.bandwidth_fraction:.0f}%" if r.bandwidth_fraction is not None else "n/a (CPU)"
        out(f"| {r.batch} | {r.decode_tokens_per_s:,.1f} | {r.step_ms:.2f} | {r.weight_bytes / 1e9:.2f} GB | {frac} |")
    engine.shutdown()
    return results
