"""benchmarks/compile_launches.py: the kernels' GPU launch configurations at the published shapes (which the CPU
tests never reach) compile for sm_90a, each reported with its registers and spills."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_launch_configurations_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_launches.py")], capture_output=True,
                          text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "21 variants compiled for sm_90a, 0 failed" in done.stdout
    assert sum(line.startswith("ok   ") and "spill_bytes=" in line for line in done.stdout.splitlines()) == 21
