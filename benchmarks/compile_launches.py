"""Compile the decode and prefill kernels (MLA and V4 sparse attention, the V4 compressor, the fused MoE, the FP8
GEMM at small M, the one-token GEMVs) at the launch configurations a GPU run picks for the published shapes, for
sm_90a, on any machine (no GPU): registers, spills, ptxas's wgmma notes and, with --loops, each loop's SASS
instruction mix. The CPU tests reach only small shapes and, for the fused MoE, the interpreter's own tiles, so these
are the launches tools/compile_sm90.py cannot see. Numbers from this script are in BENCHMARKS.md.

    python benchmarks/compile_launches.py [--only NAME] [--loops]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import compile_sm90  # noqa: E402

ALIGNED_INT = 4096     # every int argument not named: a size or stride divisible by 16, as the shapes here are

MLA = ("dsinfer.kernels.mla_triton", "_mla_attention_kernel",
       dict(QL="bfloat16", QP="bfloat16", CS="float32", KV="bfloat16", BlockTables="int32", CuSeqQ="int32",
            SeqLens="int32", Out="bfloat16", Lse="float32"), dict(H=128, num_splits=4, sm_scale_log2=0.1))
MOE_PTRS = dict(a_s_ptr="float32", w_s_ptr="float32", w3_s_ptr="float32", out_ptr="bfloat16", slots_ptr="int32",
                block_expert_ptr="int32", route_w_ptr="float32", slot_out_ptr="float32", idx_ptr="int64")
MOE_BF16 = ("dsinfer.kernels.fused_moe", "_moe_gemm_kernel",
            dict(MOE_PTRS, a_ptr="bfloat16", w_ptr="bfloat16", w3_ptr="bfloat16"), dict(top_k=6, slot_k=6, first=0))
MOE_FP8 = ("dsinfer.kernels.fused_moe", "_moe_gemm_kernel",
           dict(MOE_PTRS, a_ptr="float8_e4m3fn", w_ptr="float8_e4m3fn", w3_ptr="float8_e4m3fn"),
           dict(top_k=8, slot_k=8, first=0))
GEMV8 = ("dsinfer.kernels.fp8_gemv_triton", "_fp8_gemv_kernel",
         dict(x_ptr="int64", w_ptr="int32", w_s_ptr="float32", w3_ptr="int32", w3_s_ptr="float32",
              out_ptr="bfloat16", slots_ptr="float32", idx_ptr="int64"), dict(first=0))
GEMV4 = ("dsinfer.kernels.fp4_gemv_triton", "_fp4_gemv_kernel",
         dict(x_ptr="int64", w_ptr="int32", w_s_ptr="uint8", w3_ptr="int32", w3_s_ptr="uint8", out_ptr="bfloat16",
              idx_ptr="int64", route_ptr="float32"), dict(top_k=6, first=0))

SPARSE = ("dsinfer.kernels.v4_sparse_attention_triton", "_sparse_attention_kernel",
          dict(q_ptr="bfloat16", kv_ptr="bfloat16", idx_ptr="int32", sink_ptr="float32", out_ptr="bfloat16",
               part_ptr="float32", ml_ptr="float32"), dict(H=64, D=512, scale=0.04))
COMPRESS = ("dsinfer.kernels.v4_compress_triton", "_compress_decode_kernel",
            dict(kv_ptr="float32", score_ptr="float32", ape_ptr="float32", pos_ptr="int64", slot_ptr="int64",
                 kvbuf_ptr="float32", scorebuf_ptr="float32", prevkv_ptr="float32", prevscore_ptr="float32",
                 w_ptr="float32", cs_ptr="float32", ent_ptr="bfloat16", erow_ptr="int64"), dict(eps=1e-6))
FP8_GEMM = ("dsinfer.kernels.fp8_gemm_triton", "_fp8_gemm_kernel",
            dict(a_ptr="float8_e4m3fn", a_s_ptr="float32", b_ptr="float8_e4m3fn", b_s_ptr="float32",
                 c_ptr="bfloat16"), dict(M=16))

MLA_V3 = dict(PAGE_SIZE=64, R=512, P=64, BLOCK_R=512, BLOCK_P=64, BLOCK_H=64, BLOCK_T=1, BLOCK_N=64, BLOCK_V=512,
              SPLIT=True, ROPE=True, IEEE=False)
MOE = dict(A_PER_TOKEN=True, MUL_ROUTE=False, DENSE=False, PER_SLOT=False, ACCUMULATE=False, SUM_SLOTS=False,
           DOT_FP32=False, SWIGLU_LIMIT=0.0, SCALED_DOT=False)
GEMV8_C = dict(EVEN=True, QUANT=True, UE8M0=True, GATED=False, SWIGLU_LIMIT=0.0, ACCUMULATE=False, TOP_K=0)
GEMV4_C = dict(BLOCK_N=16, BLOCK_W=128, EVEN=True, X_BF16=True)

# (label, kernel, constexprs, options)
LAUNCHES = [
    ("mla decode, V3 (64 heads x 64 keys, 2 stages)", MLA, MLA_V3, dict(num_warps=8, num_stages=2)),
    ("mla decode, V3, 1 stage", MLA, MLA_V3, dict(num_warps=8, num_stages=1)),
    ("mla decode, V3, 16 keys, block_v 256, 1 stage", MLA, dict(MLA_V3, BLOCK_N=16, BLOCK_V=256),
     dict(num_warps=8, num_stages=1)),
    ("mla decode, V3, block_v 128", MLA, dict(MLA_V3, BLOCK_V=128), dict(num_warps=8, num_stages=2)),
    ("moe fp8 block-scaled gate/up, 64-row tiles", MOE_FP8,
     dict(MOE, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GATED=True, MODE=2), dict(num_warps=4, num_stages=3)),
    ("moe fp8 block-scaled gate/up, 64-row tiles, 8 warps", MOE_FP8,
     dict(MOE, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GATED=True, MODE=2), dict(num_warps=8, num_stages=3)),
    ("moe fp8 block-scaled down, 64-row tiles", MOE_FP8,
     dict(MOE, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GATED=False, A_PER_TOKEN=False, MUL_ROUTE=True, MODE=2),
     dict(num_warps=4, num_stages=3)),
    ("moe fp8 block-scaled gate/up, 16-row tiles", MOE_FP8,
     dict(MOE, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GATED=True, MODE=2), dict(num_warps=4, num_stages=4)),
    ("moe bf16 gate/up, 64-row tiles", MOE_BF16,
     dict(MOE, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GATED=True, MODE=0), dict(num_warps=4, num_stages=3)),
    ("moe bf16 gate/up, 64-row tiles, 8 warps", MOE_BF16,
     dict(MOE, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GATED=True, MODE=0), dict(num_warps=8, num_stages=3)),
    ("moe bf16 gate/up, 16-row tiles, 256-deep K", MOE_BF16,
     dict(MOE, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GATED=True, MODE=0), dict(num_warps=4, num_stages=4)),
    ("v4 sparse attention, 64 heads x 512, split", SPARSE,
     dict(BLOCK_H=16, BLOCK_K=32, BLOCK_D=512, IEEE=False, SPLIT=True), dict(num_warps=8)),
    ("v4 compressor decode, CSA (ratio 4, overlap, d 512)", COMPRESS,
     dict(M=4, D=512, RD=64, WIDTH=1024, OVERLAP=True, ROTATE=False, QAT=True, BLOCK_W=1024, BLOCK_S=8,
          BLOCK_P=256, BLOCK_D=512, LOG2D=9, QAT_BLOCK=64), dict(num_warps=4)),
    ("v4 compressor decode, indexer (ratio 4, d 128, Hadamard)", COMPRESS,
     dict(M=4, D=128, RD=64, WIDTH=256, OVERLAP=True, ROTATE=True, QAT=True, BLOCK_W=256, BLOCK_S=8,
          BLOCK_P=64, BLOCK_D=128, LOG2D=7, QAT_BLOCK=64), dict(num_warps=2)),
    ("v4 compressor decode, HCA (ratio 128, d 512)", COMPRESS,
     dict(M=128, D=512, RD=64, WIDTH=512, OVERLAP=False, ROTATE=False, QAT=True, BLOCK_W=512, BLOCK_S=8,
          BLOCK_P=256, BLOCK_D=512, LOG2D=9, QAT_BLOCK=64), dict(num_warps=4)),
    ("fp8 gemm, M 16 (small-M rule: 32 columns, 4 stages)", FP8_GEMM,
     dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, EVEN_K=True, SPLIT_K=1), dict(num_warps=4, num_stages=4)),
    ("fp8 gemv, 16 rows x 1024 bytes", GEMV8, dict(GEMV8_C, BLOCK_N=16, BLOCK_W=256), dict(num_warps=4)),
    ("fp8 gemv, 8 rows x 1024 bytes", GEMV8, dict(GEMV8_C, BLOCK_N=8, BLOCK_W=256), dict(num_warps=4)),
    ("fp8 gemv, 4 rows x 2048 bytes", GEMV8, dict(GEMV8_C, BLOCK_N=4, BLOCK_W=512), dict(num_warps=4)),
    ("fp4 gemv gate/up, 16 rows x 512 bytes", GEMV4, dict(GEMV4_C, GATED=True, MUL_ROUTE=False, SWIGLU_LIMIT=10.0),
     dict(num_warps=2)),
    ("fp4 gemv down, 16 rows x 512 bytes", GEMV4, dict(GEMV4_C, GATED=False, MUL_ROUTE=True, SWIGLU_LIMIT=0.0),
     dict(num_warps=2)),
]


def record(label: str, kernel: tuple, constexprs: dict, options: dict) -> dict:
    """A launch in tools/compile_sm90.py's log format: named pointers and values as given, other ints aligned."""
    module, name, pointers, values = kernel
    fn = getattr(__import__(module, fromlist=[name]), name)
    args = {}
    for p in fn.params:
        if p.is_constexpr:
            args[p.name] = ["bool" if isinstance(constexprs[p.name], bool) else "int", constexprs[p.name]]
        elif p.name in pointers:
            args[p.name] = ["ptr", pointers[p.name], True]
        elif p.name in values:
            args[p.name] = ["float" if isinstance(values[p.name], float) else "int", values[p.name]]
        else:
            args[p.name] = ["int", ALIGNED_INT]
    return {"module": module, "name": name, "label": label, "options": options, "args": args}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="launches whose label contains this")
    parser.add_argument("--loops", action="store_true", help="print each loop's SASS instruction mix")
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for launch in LAUNCHES:
            if not args.only or args.only in launch[0]:
                f.write(json.dumps(record(*launch)) + "\n")
    try:
        return compile_sm90.compile_log(f.name, None, args.loops)
    finally:
        os.unlink(f.name)


if __name__ == "__main__":
    sys.exit(main())
