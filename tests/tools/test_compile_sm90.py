"""tools/compile_sm90.py: kernels launched on CPU (Triton's interpreter) compiled for sm_90a with Triton's CUDA
backend, no GPU needed. The interpreter accepts programs the GPU compiler refuses; this is where they show."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dsinfer.kernels.fp8_gemv import fp8_gemv
from dsinfer.kernels.fused_moe import fused_moe

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import compile_sm90  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="records launches through Triton's interpreter")


def _compile(log: Path, extra_path: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(ROOT / "tools" / "compile_sm90.py"), "--log", str(log)],
                          capture_output=True, text=True, env=env, timeout=600)


def _fp4_experts(E, inter, D):
    g = torch.Generator().manual_seed(0)
    shapes = ((inter, D), (D, inter), (inter, D))
    ws = [torch.randint(0, 256, (E, n, m // 2), generator=g, dtype=torch.uint8) for n, m in shapes]
    ss = [torch.randint(118, 126, (E, n, m // 32), generator=g, dtype=torch.uint8) for n, m in shapes]
    return ws, ss


def test_decode_kernels_compile_for_hopper(tmp_path):
    """The FP4 experts' grouped GEMM with float32 and bf16 activations (float32 once failed to compile: a dot of
    float32 and bf16 in a branch the interpreter never took), their one-token GEMV and the FP8 GEMV."""
    log = tmp_path / "launches.jsonl"
    (w1, w2, w3), (s1, s2, s3) = _fp4_experts(4, 64, 128)
    route_w = torch.full((3, 2), 0.5)
    indices = torch.tensor([[0, 1], [2, 3], [1, 2]])
    n, k = 256, 512
    w = torch.randn(n, k).to(torch.float8_e4m3fn)
    s = torch.rand(n // 128, k // 128) + 0.5
    with compile_sm90.recording(str(log)):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(3, 128).to(dtype)
            fused_moe(x, route_w, indices, w1, w2, w3, s1, s2, s3, mode="fp4_weight_only", swiglu_limit=0.5)
        fused_moe(x[:1], route_w[:1], indices[:1], w1, w2, w3, s1, s2, s3, mode="fp4_weight_only")
        fp8_gemv(torch.randn(1, k).to(torch.bfloat16), w, s, quantize=True, scale_fmt="ue8m0")
    names = log.read_text()
    assert all(kernel in names for kernel in ("_moe_gemm_kernel", "_fp4_gemv_kernel", "_fp8_gemv_kernel"))
    done = _compile(log)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " 0 failed" in done.stdout and "registers=" in done.stdout and "spill_bytes=0" in done.stdout


def test_a_kernel_the_gpu_compiler_refuses_is_reported(tmp_path):
    """The shape of the fused-MoE bug: the interpreter runs the branch it takes; the CUDA backend also compiles
    the code after a constexpr-guarded return, refuses its float32 x bf16 dot, and the tool says so (exit 1)."""
    (tmp_path / "sm90_broken.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        @triton.jit
        def _product(a, b, EXACT: tl.constexpr):
            if EXACT:
                return tl.dot(a, b.to(tl.float32), input_precision="ieee")
            return tl.dot(a, b)             # compiled even when EXACT returned above: float32 x bf16

        @triton.jit
        def early_return_kernel(a_ptr, b_ptr, out_ptr, B: tl.constexpr, EXACT: tl.constexpr):
            i = tl.arange(0, B)
            a = tl.load(a_ptr + i[:, None] * B + i[None, :])
            b = tl.load(b_ptr + i[:, None] * B + i[None, :])
            tl.store(out_ptr + i[:, None] * B + i[None, :], _product(a, b, EXACT))
    '''))
    sys.path.insert(0, str(tmp_path))
    try:
        import sm90_broken
    finally:
        sys.path.remove(str(tmp_path))
    log = tmp_path / "launches.jsonl"
    a, b, out = torch.randn(16, 16), torch.randn(16, 16).to(torch.bfloat16), torch.empty(16, 16)
    with compile_sm90.recording(str(log)):
        sm90_broken.early_return_kernel[(1,)](a, b, out, B=16, EXACT=True)
    done = _compile(log, str(tmp_path))
    assert done.returncode == 1
    assert "FAIL early_return_kernel" in done.stdout and "1 failed" in done.stdout
