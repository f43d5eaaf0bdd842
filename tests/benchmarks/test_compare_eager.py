"""benchmarks/compare_eager.py: the verdict on two paths' greedy steps, and one whole run (on CPU both paths are
the torch twins, so this checks the machinery the 8-GPU comparison relies on: two engines from one seed, each
in its own process, tensor parallel included)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from compare_eager import compare  # noqa: E402

STEPS = [[(5, -0.1, 2.0), (7, -0.5, 0.3)], [(1, -1.0, 0.1)]]


def test_identical_steps_pass():
    lines = []
    assert compare([3, 4], STEPS, STEPS, 0.1, lines.append)
    assert lines[-1].startswith("2/2 requests identical")


def test_a_different_token_fails_and_names_the_step():
    eager = [[(5, -0.1, 2.0), (8, -0.6, 0.2)], STEPS[1]]
    lines = []
    assert not compare([3, 4], STEPS, eager, 0.1, lines.append)
    assert "differs at step 1 (fast 7, eager 8)" in lines[0] and "margin there 0.300" in lines[0]


def test_logprobs_beyond_the_tolerance_fail():
    eager = [[(5, -0.3, 2.0), (7, -0.5, 0.3)], STEPS[1]]
    assert not compare([3, 4], STEPS, eager, 0.1, lambda _: None)
    assert compare([3, 4], STEPS, eager, 0.25, lambda _: None)


@pytest.mark.parametrize("tp", [1, 2])
def test_a_whole_run_on_cpu(checkpoint, tp):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_eager.py"), "--config",
                          str(checkpoint("v3")), "--device", "cpu", "--tp", str(tp), "--prompts", "3",
                          "--max-prompt-len", "20", "--max-tokens", "4"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3/3 requests identical" in run.stdout
