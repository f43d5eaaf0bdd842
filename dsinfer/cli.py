"""The `dsinfer` command line: generate, chat, perplexity; checkpoint tools cast, convert, inspect.

User errors (bad paths, bad flags, prompts that do not fit) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BUNDLED_NOTE = "default: the bundled Shakespeare model"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"Hugging Face checkpoint folder ({BUNDLED_NOTE})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--max-model-len", type=int, help="longest prompt + generation (default: the model's)")
    p.add_argument("--attn-impl", default="absorb", choices=["absorb", "naive"],
                   help="MLA form: weight-absorbed (default) or naive (reference)")
    p.add_argument("--enforce-eager", action="store_true", help="GPU: run decode steps eagerly, without CUDA graphs")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="split the model over N processes, one GPU each (gloo on CPU); torchrun: its WORLD_SIZE")
    p.add_argument("--no-simulate-qat", action="store_true",
                   help="DeepSeek-V4: skip the reference's FP8/FP4 rounding of KV and indexer (matches HF)")


def _add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default: {temperature})")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filtering")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsinfer", description="Inference for DeepSeek models (V2, V3, R1, V3.1).")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete one or more prompts",
                       description=f"Complete prompts with a model ({BUNDLED_NOTE}).")
    _add_model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--input-file", help="a text file of prompts separated by blank lines")
    _add_sampling_args(g, temperature=0.8)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat (/clear resets, /exit quits)",
                       description=f"Chat through the checkpoint's chat template ({BUNDLED_NOTE}).")
    _add_model_args(c)
    c.add_argument("--system", help="a system prompt")
    c.add_argument("--thinking", action="store_true", help="thinking mode (V3.1 templates: thinking=True)")
    _add_sampling_args(c, temperature=0.6)
    c.set_defaults(func=cmd_chat)

    q = sub.add_parser("perplexity", help="perplexity of a text file over sliding windows",
                       description=f"Perplexity of a text ({BUNDLED_NOTE}; text default: the bundled Hamlet).")
    _add_model_args(q)
    q.add_argument("--text-file", help="text to score (default: the bundled Hamlet, with the bundled model)")
    q.add_argument("--context", type=int, default=512, help="window length in tokens (default: 512)")
    q.add_argument("--stride", type=int, help="window start step (default: context // 2)")
    q.set_defaults(func=cmd_perplexity)

    k = sub.add_parser("cast", help="FP8 checkpoint -> BF16, or BF16 -> the published FP8 format",
                       description="Dequantize an FP8 checkpoint to BF16 or quantize a BF16 one to FP8 (e4m3, "
                                   "128x128 block scales, the weights DeepSeek ships in FP8), shard by shard. "
                                   "DeepSeek-V4: --to fp8 repacks the FP4 experts as FP8 losslessly, --to bf16 "
                                   "dequantizes everything.")
    k.add_argument("--model", required=True, help="source checkpoint folder")
    k.add_argument("--out", required=True, help="destination folder (must not exist or be empty, unless --force)")
    k.add_argument("--to", required=True, choices=["bf16", "fp8"])
    k.add_argument("--scale-fmt", choices=["ue8m0"], help="with --to fp8: power-of-two scales, as in V3.1")
    k.add_argument("--force", action="store_true", help="replace a non-empty --out")
    k.set_defaults(func=cmd_cast)

    v = sub.add_parser("convert", help="split a checkpoint into per-rank files for tensor parallelism",
                       description="Write model{rank}-mp{N}.safetensors files (reference-style sharding, HF "
                                   "tensor names) plus config, tokenizer and a dsinfer_tp.json manifest.")
    v.add_argument("--model", required=True, help="source checkpoint folder")
    v.add_argument("--out", required=True, help="destination folder (must not exist or be empty, unless --force)")
    v.add_argument("--tp", required=True, type=int, help="tensor-parallel size N")
    v.add_argument("--force", action="store_true", help="replace a non-empty --out")
    v.set_defaults(func=cmd_convert)

    i = sub.add_parser("inspect", help="version, parameters, bytes, KV cache, and whether it fits on GPUs",
                       description="Size up a checkpoint from its config.json and safetensors headers (or from "
                                   "config.json alone); with --gpus and --gpu-mem, how it fits.")
    i.add_argument("--model", required=True, help="checkpoint folder, or a config.json")
    i.add_argument("--gpus", type=int, help="number of GPUs (tensor-parallel size)")
    i.add_argument("--gpu-mem", type=float, help="memory per GPU in GiB")
    i.add_argument("--context", type=int, help="tokens per sequence, for the largest batch that fits")
    i.set_defaults(func=cmd_inspect)

    b = sub.add_parser("bench", help="decode/prefill speed of a random-weight model of a named shape",
                       description="Random weights with the exact shapes of a config, built on the device without "
                                   "a checkpoint; decode tokens/s per batch size against the copy bandwidth.")
    b.add_argument("--config", default="v2-lite",
                   help="v2-lite, v3, v4-flash, or a config.json path (default: v2-lite)")
    b.add_argument("--layers", type=int, help="keep only the first N layers (e.g. --config v3 --layers 4)")
    b.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128])
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--decode-steps", type=int, default=64)
    b.add_argument("--prefill-len", type=int, nargs="+", default=[4096],
                   help="prompt lengths whose prefill is timed (default: 4096)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    b.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    b.add_argument("--fp8-impl", default="auto", choices=["auto", "torch", "fp8_gemm", "weight_only"])
    b.add_argument("--attn-backend", default="auto", choices=["auto", "torch", "triton"])
    b.add_argument("--moe-backend", default="auto", choices=["auto", "torch", "triton"])
    b.add_argument("--enforce-eager", action="store_true", help="run decode steps eagerly, without CUDA graphs")
    b.add_argument("--tp", type=int, default=1, metavar="N",
                   help="split the model over N processes, one GPU each (gloo on CPU); torchrun: its WORLD_SIZE")
    b.set_defaults(func=cmd_bench)

    from .server.cli import add_serve_parser  # FastAPI and uvicorn are imported only when serving
    add_serve_parser(sub)
    return parser


def _llm(args):
    from .llm import LLM
    if args.model is None:
        print("dsinfer: using the bundled Shakespeare model (pass --model for another)", file=sys.stderr)
    return LLM(args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
               attn_impl=args.attn_impl, enforce_eager=args.enforce_eager, progress=sys.stderr.isatty(),
               tensor_parallel_size=args.tp,
               simulate_qat=False if args.no_simulate_qat else None)


def _sampling(args):
    from .sampling import SamplingParams
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_new_tokens, stop=tuple(args.stop), seed=args.seed)


def _read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"file {path} does not exist")
    return p.read_text(encoding="utf-8")


def cmd_generate(args) -> int:
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        prompts = [b.strip("\n") for b in _read_text(args.input_file).split("\n\n") if b.strip()]
        if not prompts:
            raise ValueError(f"{args.input_file} holds no prompts")
    params = _sampling(args)
    llm = _llm(args)
    for i, out in enumerate(llm.generate(prompts, params)):
        if i:
            print()
        print(prompts[i] + out.text, flush=True)
    return 0


def cmd_chat(args) -> int:
    params = _sampling(args)
    llm = _llm(args)
    kwargs = {"thinking": True} if args.thinking else {}
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print("dsinfer chat: /clear resets the conversation, /exit quits", file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            continue
        if line.strip() == "/exit":
            break
        if line.strip() == "/clear":
            history = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        prompt = llm.tokenizer.encode_chat(system + history, add_generation_prompt=True, **kwargs)
        reply = []
        for delta in llm.stream(prompt, params):
            reply.append(delta)
            print(delta, end="", flush=True)
        print(flush=True)
        history.append(_assistant_turn("".join(reply)))
    return 0


def _assistant_turn(reply: str) -> dict:
    """A reply as a history message: a thinking model's reasoning (the text before `</think>`, the prompt having
    opened the block) goes to `reasoning_content`, which the templates drop or keep as their model expects."""
    reasoning, sep, content = reply.partition("</think>")
    if not sep:
        return {"role": "assistant", "content": reply}
    return {"role": "assistant", "content": content.lstrip("\n"), "reasoning_content": reasoning.strip("\n")}


def cmd_perplexity(args) -> int:
    from .assets import HAMLET
    from .perplexity import perplexity
    if args.text_file is None and args.model is not None:
        raise ValueError("--text-file is required with --model")
    text = _read_text(args.text_file or str(HAMLET))
    llm = _llm(args)
    ids = llm.tokenizer.encode(text)
    ppl, count = perplexity(llm.engine, ids, args.context, args.stride or args.context // 2)
    print(f"tokens evaluated: {count}")
    print(f"perplexity: {ppl:.4f}")
    return 0


def cmd_cast(args) -> int:
    from .checkpoint import cast_checkpoint
    out = cast_checkpoint(args.model, args.out, args.to, args.scale_fmt, args.force, progress=sys.stderr.isatty())
    print(f"wrote {out}")
    return 0


def cmd_convert(args) -> int:
    from .checkpoint import convert_checkpoint
    out = convert_checkpoint(args.model, args.out, args.tp, args.force, progress=sys.stderr.isatty())
    print(f"wrote {out}")
    return 0


def cmd_inspect(args) -> int:
    from .checkpoint import format_sizing, inspect_checkpoint
    print(format_sizing(inspect_checkpoint(args.model, args.gpus, args.gpu_mem, args.context)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        print(f"dsinfer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def cmd_bench(args) -> int:
    from .bench import bench_config, run_bench
    from .config import EngineConfig
    for name in ("prompt_len", "decode_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if any(n < 1 for n in args.prefill_len):
        raise ValueError("--prefill-len lengths must be at least 1")
    if any(b < 1 for b in args.batch):
        raise ValueError("--batch sizes must be at least 1")
    cfg = bench_config(args.config, args.layers)
    longest = max(args.prompt_len + args.decode_steps + 4, max(args.prefill_len) + 2)
    config = EngineConfig(device=args.device, dtype=args.dtype, max_model_len=longest,
                          max_num_seqs=max(args.batch), max_num_batched_tokens=max(4096, max(args.batch)),
                          enable_prefix_caching=False, fp8_impl=args.fp8_impl, attn_backend=args.attn_backend,
                          moe_backend=args.moe_backend, enforce_eager=args.enforce_eager, progress=False,
                          tensor_parallel_size=args.tp)
    run_bench(cfg, config, args.batch, args.prompt_len, args.decode_steps, args.prefill_len)
    return 0
