"""The bundled Shakespeare model (a trained DeepSeek-V3-architecture checkpoint): dsinfer reproduces the
perplexity HF transformers measured for its model card, and HF's greedy continuation; the CLI runs on it
without --model."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import DeepseekV3ForCausalLM

from dsinfer import LLM, SamplingParams
from dsinfer.assets import BUNDLED_MODEL, HAMLET
from dsinfer.perplexity import perplexity

CARD = json.loads((BUNDLED_MODEL / "eval.json").read_text())


@pytest.fixture(scope="module")
def bf16():
    return LLM(device="cpu", dtype="bfloat16", progress=False)


def test_hamlet_perplexity_matches_the_model_card(bf16):
    ids = bf16.tokenizer.encode(HAMLET.read_text())
    ppl, n = perplexity(bf16.engine, ids, CARD["window"], CARD["stride"])
    assert n == CARD["tokens_evaluated"]
    assert ppl == pytest.approx(CARD["hamlet_ppl_hf_fp32"], rel=5e-3)
    assert ppl < CARD["hamlet_unigram_ppl"] / 5          # genuinely trained: far below the unigram model


def test_greedy_64_tokens_match_hf():
    llm = LLM(device="cpu", dtype="float32", progress=False)
    prompt = "KING.\nWhat news, my lord? They say the king is sick and will not eat.\n\nQUEEN.\n"
    ids = llm.tokenizer.encode(prompt)
    ours = llm.generate([ids], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))[0].token_ids
    hf = DeepseekV3ForCausalLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=2)
    assert ours == ref[0, len(ids):].tolist()


def test_chat_answers_in_verse_and_stops(bf16):
    reply = bf16.chat([{"role": "user", "content": "What news, my lord?"}],
                      SamplingParams(temperature=0, max_tokens=200))
    assert reply.finish_reason == "stop" and reply.text.strip()


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "dsinfer", *args, "--device", "cpu"], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_cli_without_model():
    gen = run_cli("generate", "--prompt", "ROMEO:", "--max-new-tokens", "24", "--seed", "0")
    assert gen.returncode == 0 and gen.stdout.startswith("ROMEO:") and len(gen.stdout) > len("ROMEO:\n")
    assert "bundled" in gen.stderr
    chat = run_cli("chat", "--max-new-tokens", "40", "--temperature", "0",
                   stdin="What news, my lord?\n/clear\nGood morrow.\n/exit\n")
    assert chat.returncode == 0 and len([line for line in chat.stdout.splitlines() if line.strip()]) >= 2
