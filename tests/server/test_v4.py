"""`dsinfer serve` on a tiny DeepSeek-V4 checkpoint: the paged engine behind the HTTP API gives the offline LLM's
greedy completions (one request at a time, so both run the same batch shapes)."""

import httpx
from serverproc import serve

from dsinfer import LLM, SamplingParams


def test_serve_v4_completions_match_llm(checkpoint, tmp_path):
    path = checkpoint("v4")
    llm = LLM(path, device="cpu", dtype="float32", progress=False)
    prompts = ["Hello world", "The quick brown fox jumps over the lazy dog, again and again and again"]
    want = [llm.generate(p, SamplingParams(temperature=0, max_tokens=8))[0].text for p in prompts]
    with serve(tmp_path, "--model", str(path), "--max-num-seqs", "4") as server:
        for p, w in zip(prompts, want):
            r = httpx.post(server.base_url + "/completions", timeout=60,
                           json=dict(model=path.name, prompt=p, max_tokens=8, temperature=0))
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == w
