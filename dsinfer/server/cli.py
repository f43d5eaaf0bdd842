"""`dsinfer serve`: the OpenAI-compatible HTTP server. Also runnable as `python -m dsinfer.server.cli ...`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

DESCRIPTION = ("Serve a model over an OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, "
               "/v1/models, /health, /metrics (default model: the bundled Shakespeare model).")


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server", description=DESCRIPTION)
    _add_arguments(p)
    p.set_defaults(func=cmd_serve)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    s.add_argument("--api-key", default=os.environ.get("DSINFER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: "
                        "$DSINFER_API_KEY, else no key)")
    s.add_argument("--served-model-name", help="model name in the API (default: the checkpoint folder's name)")
    s.add_argument("--max-concurrent-requests", type=int, default=512,
                   help="generation requests in flight; more are answered 429 (default: 512)")
    s.add_argument("--graceful-shutdown-s", type=float, default=10.0,
                   help="on SIGINT/SIGTERM, seconds running requests may take to finish (default: 10)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    e = p.add_argument_group("engine")
    e.add_argument("--model", help="Hugging Face checkpoint folder (default: the bundled Shakespeare model)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    e.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    e.add_argument("--max-model-len", type=int, help="longest prompt + generation (default: the model's)")
    e.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together (default: 64)")
    e.add_argument("--max-num-batched-tokens", type=int, default=4096, help="tokens per forward pass (default: 4096)")
    e.add_argument("--page-size", type=int, default=64, help="tokens per KV-cache page (default: 64)")
    e.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    e.add_argument("--cpu-cache-gib", type=float, default=1.0, help="KV-cache budget on CPU (default: 1 GiB)")
    e.add_argument("--attn-impl", default="absorb", choices=["absorb", "naive"])
    e.add_argument("--attn-backend", default="auto", choices=["auto", "torch", "triton"])
    e.add_argument("--enforce-eager", action="store_true", help="GPU: run decode steps eagerly, without CUDA graphs")
    e.add_argument("--no-simulate-qat", action="store_true",
                   help="DeepSeek-V4: skip the reference's FP8/FP4 rounding of KV and indexer (matches HF)")
    e.add_argument("--tp", type=int, default=1, metavar="N",
                   help="split the model over N processes, one GPU each (gloo on CPU); torchrun: its WORLD_SIZE")
    e.add_argument("--no-prefix-caching", action="store_true", help="do not reuse cached prompt prefixes")
    e.add_argument("--seed", type=int, default=0, help="seed for requests that give none (default: 0)")
    e.add_argument("--random-weights", metavar="CONFIG",
                   help="benchmarking: serve random weights with the shapes of CONFIG (v2-lite, v3, or a "
                        "config.json) and the tokenizer of --model (default: the bundled one)")
    e.add_argument("--layers", type=int, help="with --random-weights: keep only the first N layers")


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise ValueError(f"dsinfer serve needs FastAPI and uvicorn ({e}); install them with "
                         "pip install 'dsinfer[server]'") from None
    from ..assets import default_model_path
    from ..config import EngineConfig
    from .config import ServerConfig

    model = Path(args.model) if args.model else default_model_path()
    server_config = ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key,
        served_model_name=args.served_model_name or model.resolve().name,
        max_concurrent_requests=args.max_concurrent_requests, graceful_shutdown_s=args.graceful_shutdown_s)
    engine_config = EngineConfig(
        device=args.device, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, page_size=args.page_size,
        gpu_memory_utilization=args.gpu_memory_utilization, cpu_cache_gib=args.cpu_cache_gib,
        attn_impl=args.attn_impl, attn_backend=args.attn_backend, enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tp,
        enable_prefix_caching=False if args.no_prefix_caching else None, seed=args.seed, progress=sys.stderr.isatty())
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    engine = engine_config
    if args.no_simulate_qat and not args.random_weights:
        from ..engine import Engine
        engine = Engine(model, engine_config, simulate_qat=False)     # refused with one line for non-V4 models
    if args.random_weights:
        from ..bench import bench_config
        from ..engine import Engine
        from ..tokenizer import Tokenizer
        engine = Engine.from_random(bench_config(args.random_weights, args.layers), engine_config,
                                    Tokenizer.from_dir(model))
    app = create_app(engine, server_config, model)
    config = uvicorn.Config(app, host=server_config.host, port=server_config.port, log_level=args.log_level,
                            timeout_graceful_shutdown=server_config.graceful_shutdown_s)
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal under the handlers it found;
    # with these the re-raised signal is a no-op and a clean shutdown exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsinfer serve", description=DESCRIPTION)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_serve(args)
    except (ValueError, OSError) as e:
        print(f"dsinfer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
