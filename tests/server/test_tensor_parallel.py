"""`dsinfer serve --tp 2` on the CPU: a request gets what the one-process engine generates (the oracle: the
offline LLM); then a worker is killed, and the server exits with status 1 and one clear line, without hanging."""

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from serverproc import serve

from dsinfer import SamplingParams


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker through /proc (Linux)")
def test_serve_tp2_then_a_worker_dies(tmp_path, llm):
    with serve(tmp_path, "--tp", "2") as server:
        body = {"model": "shakespeare-v3", "prompt": "ROMEO:", "max_tokens": 16, "temperature": 0}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        want = llm.generate("ROMEO:", SamplingParams(temperature=0, max_tokens=16))[0].text
        assert r.json()["choices"][0]["text"] == want

        workers = children(server.proc.pid)
        assert len(workers) == 1
        assert b"dsinfer.launch" in Path(f"/proc/{workers[0]}/cmdline").read_bytes()
        os.kill(workers[0], signal.SIGKILL)
        start = time.monotonic()
        assert server.proc.wait(60) == 1
        assert time.monotonic() - start < 30
        lines = [ln for ln in server.log_text().splitlines() if ln.startswith("dsinfer: error:")]
        want = (f"dsinfer: error: tensor-parallel worker rank 1 (pid {workers[0]}) was killed by signal 9; "
                "stopping all ranks")
        assert lines == [want]
