"""The `dsinfer` command line, run as a subprocess on a tiny V3 checkpoint.

Oracles: the offline `LLM` API (greedy, one prompt at a time) for what generate and chat print; HF transformers
(tokenizer and model) for the token count and perplexity; and the CLI contract for user errors (status 2, one
line on stderr starting "dsinfer: error:", no traceback). Each subprocess costs a few seconds (importing torch),
so every run is started at once by one module fixture and the tests check their results.
"""

import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dsinfer import LLM, SamplingParams

MAX_LEN = 128
GREEDY = SamplingParams(temperature=0, max_tokens=8)
PROMPT = "Hello world!"
FILE_PROMPTS = ["The quick brown fox", "To be,\nor not to be", "0123 + 45 ="]    # the second spans two lines
CHAT_INPUT = "hello\n/clear\nhi again\n/exit\nnever answered\n"
SHAKESPEARE = ("To be, or not to be, that is the question. Whether tis nobler in the mind to suffer "
               "the slings and arrows of outrageous fortune.")


def run_cli(*args, stdin=None):
    env = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")   # runs share the cores
    return subprocess.run([sys.executable, "-m", "dsinfer", *map(str, args)], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", env=env, timeout=300)


def cli_runs(model, tmp):
    """name -> (CLI arguments, stdin) of every run this file checks."""
    cpu = ["--model", model, "--device", "cpu"]
    small = [*cpu, "--dtype", "float32", "--max-model-len", MAX_LEN]
    greedy = [*small, "--temperature", 0, "--max-new-tokens", 8]
    return {
        "generate-prompt": (["generate", *greedy, "--prompt", PROMPT], None),
        "generate-tp2": (["generate", *greedy, "--tp", 2, "--input-file", tmp / "prompts.txt"], None),
        "generate-input-file": (["generate", *greedy, "--input-file", tmp / "prompts.txt"], None),
        "chat": (["chat", *greedy], CHAT_INPUT),
        "perplexity": (["perplexity", *small, "--text-file", tmp / "text.txt", "--context", MAX_LEN], None),
        # user errors
        "missing-model-path": (["generate", "--model", tmp / "no-such-folder", "--device", "cpu", "--prompt", "hi"],
                               None),
        "folder-without-config": (["generate", "--model", tmp / "tokenizer-only", "--device", "cpu",
                                   "--prompt", "hi"], None),
        "missing-input-file": (["generate", *cpu, "--input-file", tmp / "nope.txt"], None),
        "prompt-too-long": (["generate", *cpu, "--max-model-len", 16, "--prompt", "x " * 40], None),
        "cuda-without-gpu": (["generate", "--model", model, "--device", "cuda", "--prompt", "hi"], None),
        "top-p-zero": (["generate", *cpu, "--top-p", 0, "--prompt", "hi"], None),
        "tp-not-dividing": (["generate", *cpu, "--tp", 3, "--prompt", "hi"], None),
    }


ERROR_WORDS = {  # error run -> a word its message must hold
    "missing-model-path": "no-such-folder", "folder-without-config": "config.json", "missing-input-file": "nope.txt",
    "prompt-too-long": "16", "cuda-without-gpu": "cuda", "top-p-zero": "top_p",
    "tp-not-dividing": "--tp 3 does not divide num_attention_heads = 4"}


@pytest.fixture(scope="module")
def model(checkpoint):
    return checkpoint("v3")


@pytest.fixture(scope="module")
def runs(model, tmp_path_factory):
    """Start every CLI run at once (each costs seconds, mostly importing torch): name -> Future."""
    tmp = tmp_path_factory.mktemp("cli")
    p1, p2, p3 = FILE_PROMPTS                 # one blank line, or two, separate prompts; the ends may be blank too
    (tmp / "prompts.txt").write_text(f"\n{p1}\n\n\n{p2}\n\n{p3}\n\n", encoding="utf-8")
    (tmp / "text.txt").write_text(SHAKESPEARE, encoding="utf-8")
    (tmp / "tokenizer-only").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp / "tokenizer-only" / name).write_bytes((model / name).read_bytes())
    pool = ThreadPoolExecutor(max(2, os.cpu_count() or 2))
    futures = {name: pool.submit(run_cli, *args, stdin=stdin) for name, (args, stdin) in cli_runs(model, tmp).items()}
    yield futures
    pool.shutdown(cancel_futures=True)


@pytest.fixture(scope="module")
def llm(model):
    return LLM(model, device="cpu", dtype="float32", max_model_len=MAX_LEN, progress=False)


def greedy_text(llm, prompt) -> str:
    text = llm.generate(prompt, GREEDY)[0].text
    assert text, "the oracle generated nothing, so the CLI output could not show a completion"
    return text


def ok_stdout(result):
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


# -- generate --------------------------------------------------------------------------------------------------

def test_generate_prompt(runs, llm):
    expected = PROMPT + greedy_text(llm, PROMPT) + "\n"
    assert ok_stdout(runs["generate-prompt"].result()) == expected


def test_generate_input_file_prints_completions_in_order(runs, llm):
    expected = [p + greedy_text(llm, p) for p in FILE_PROMPTS]
    assert len(set(expected)) == 3
    assert ok_stdout(runs["generate-input-file"].result()) == "\n\n".join(expected) + "\n"


def test_generate_tensor_parallel(runs, llm):
    """Two ranks (rank 0 starts the other) print what one process prints."""
    expected = [p + greedy_text(llm, p) for p in FILE_PROMPTS]
    assert ok_stdout(runs["generate-tp2"].result()) == "\n\n".join(expected) + "\n"


# -- chat ------------------------------------------------------------------------------------------------------

def test_chat_through_stdin(runs, llm):
    tok = llm.tokenizer
    first = greedy_text(llm, tok.encode_chat([{"role": "user", "content": "hello"}]))
    # after /clear the second turn is a fresh conversation, not a continuation of the first
    second = greedy_text(llm, tok.encode_chat([{"role": "user", "content": "hi again"}]))
    result = runs["chat"].result()
    assert ok_stdout(result) == first + "\n" + second + "\n"
    assert "cleared" in result.stderr


# -- perplexity ------------------------------------------------------------------------------------------------

def test_perplexity_text_file(runs, model):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    hf_tok = PreTrainedTokenizerFast.from_pretrained(model)
    ids = [hf_tok.bos_token_id] + hf_tok.encode(SHAKESPEARE, add_special_tokens=False)
    assert 2 < len(ids) <= MAX_LEN                         # one window: plain next-token NLL over the whole text
    hf_model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[:-1].double(), torch.tensor(ids[1:]))
    lines = ok_stdout(runs["perplexity"].result()).splitlines()
    assert lines[0] == f"tokens evaluated: {len(ids) - 1}"
    assert lines[1].startswith("perplexity: ")
    assert float(lines[1].split(": ")[1]) == pytest.approx(math.exp(nll.item()), rel=1e-3)


# -- user errors -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.skipif(name == "cuda-without-gpu" and torch.cuda.is_available(),
                                                reason="needs a machine without a GPU"))
    for name in ERROR_WORDS])
def test_user_error_exits_2_with_one_line(runs, name):
    result = runs[name].result()
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("dsinfer: error:"), result.stderr
    assert ERROR_WORDS[name] in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("reply, turn", [
    ("Hello there.", {"role": "assistant", "content": "Hello there."}),
    ("Let me think.\n</think>\n\nHi!", {"role": "assistant", "content": "Hi!", "reasoning_content": "Let me think."}),
    ("</think>Hi", {"role": "assistant", "content": "Hi", "reasoning_content": ""}),
])
def test_chat_history_keeps_reasoning_apart(reply, turn):
    from dsinfer.cli import _assistant_turn
    assert _assistant_turn(reply) == turn
