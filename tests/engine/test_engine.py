"""The engine's request handling on a tiny V3 checkpoint: stop conditions, streaming, seeds, abort, page
accounting, and bad requests. The oracle for stopped runs is the same request run without the stop. Most tests
run twice: reading each step's tokens back at once, and with async scheduling (a step's tokens stay on the
device as the next step's input and are read back one step late)."""

import json
import shutil

import pytest
import torch

from dsinfer import LLM, SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(checkpoint, request):
    return LLM(checkpoint("v3"), device="cpu", dtype="float32", progress=False, page_size=4,
               async_scheduling=request.param)


def drain(engine):
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.seq_id, []).append(o)
    return outs


def test_stop_string_cuts_text(llm):
    full = llm.generate(["The quick"], SamplingParams(max_tokens=40, **GREEDY))[0]
    stop = full.text[10:13]
    assert stop and full.text.find(stop) >= 3
    out = llm.generate(["The quick"], SamplingParams(max_tokens=40, stop=[stop, "\x00never"], **GREEDY))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:full.text.find(stop)]
    assert full.token_ids[:len(out.token_ids)] == out.token_ids


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_eos_stops_and_is_not_in_text(tmp_path, checkpoint, async_scheduling):
    path = shutil.copytree(checkpoint("v3"), tmp_path / "ckpt")
    base = LLM(path, device="cpu", dtype="float32", progress=False)
    ref = base.generate(["Hello world"], SamplingParams(max_tokens=20, **GREEDY))[0]
    eos = ref.token_ids[6]
    first = ref.token_ids.index(eos)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, eos]}))
    llm = LLM(path, device="cpu", dtype="float32", progress=False, async_scheduling=async_scheduling)
    out = llm.generate(["Hello world"], SamplingParams(temperature=0, max_tokens=20))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == ref.token_ids[:first + 1]              # EOS is the last token ...
    assert out.text == llm.tokenizer.decode(ref.token_ids[:first])  # ... and not in the text


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_max_tokens_and_context_limit(checkpoint, async_scheduling):
    llm = LLM(checkpoint("v3"), device="cpu", dtype="float32", progress=False, max_model_len=12,
              async_scheduling=async_scheduling)
    out = llm.generate([[0, 5, 6, 7, 8]], SamplingParams(max_tokens=50, **GREEDY))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 7   # 5 + 7 = max_model_len
    out = llm.generate([[0, 5]], SamplingParams(max_tokens=3, **GREEDY))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3


def test_streamed_text_equals_final_text(llm):
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=3, stop=["zz"])
    final = llm.generate(["To be"], params)[0].text
    assert "".join(llm.stream("To be", params)) == final


def test_seeded_requests_do_not_depend_on_the_batch(llm):
    p = SamplingParams(max_tokens=16, temperature=1.0, seed=42)
    alone = llm.generate(["Hello"], p)[0].token_ids
    batch = llm.generate(["Hello", "The quick brown", "Hello"],
                         [p, SamplingParams(max_tokens=9, temperature=0.7, seed=7), p])
    assert batch[0].token_ids == alone and batch[2].token_ids == alone
    other = llm.generate(["Hello"], SamplingParams(max_tokens=16, temperature=1.0, seed=43))[0].token_ids
    assert other != alone


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_many_mixed_requests_equal_alone_and_free_all_pages(checkpoint, async_scheduling):
    llm = LLM(checkpoint("v3"), device="cpu", dtype="float32", progress=False, page_size=4, max_num_seqs=5,
              max_num_batched_tokens=16, async_scheduling=async_scheduling)
    g = torch.Generator().manual_seed(0)
    prompts = [[0] + torch.randint(7, 320, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 30, (24,), generator=g)]
    params = [SamplingParams(max_tokens=int(m), **GREEDY) for m in torch.randint(1, 12, (24,), generator=g)]
    together = [o.token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    assert together == alone
    cache = llm.engine.block_manager
    assert cache.num_free_pages == cache.num_pages


def test_abort_frees_pages(llm):
    eng = llm.engine
    free0 = eng.block_manager.num_free_pages
    ids = [eng.add_request("Hello there", SamplingParams(max_tokens=30, **GREEDY)) for _ in range(3)]
    for _ in range(3):
        eng.step()
    bm = eng.block_manager
    own = [p for p in eng.sequences[ids[1]].block_table if bm.ref_count[p] == 1]
    assert own
    before = bm.num_free_pages
    eng.abort(ids[1])
    assert bm.num_free_pages == before + len(own)
    outs = drain(eng)
    assert ids[1] not in outs
    assert eng.pop(ids[1]).finish_reason == "abort"
    for i in (ids[0], ids[2]):
        assert eng.pop(i).finish_reason == "length"
    assert eng.block_manager.num_free_pages == free0


def run_steps(eng, prompts, params):
    """Drive the engine by hand: tokens and logprobs streamed per request, and whether a step left tokens in
    flight."""
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    tokens, logprobs, in_flight = {i: [] for i in ids}, {i: [] for i in ids}, False
    while eng.has_unfinished():
        for o in eng.step():
            assert all(t >= 0 for t in o.new_token_ids)       # never a placeholder
            tokens[o.seq_id] += o.new_token_ids
            if o.logprobs is not None:
                logprobs[o.seq_id].append((o.logprobs.token_id, round(o.logprobs.logprob, 5)))
        in_flight |= eng._in_flight is not None
    seqs = [eng.pop(i) for i in ids]
    assert [s.output_ids for s in seqs] == [tokens[i] for i in ids]
    assert eng.block_manager.num_free_pages == eng.block_manager.num_pages
    return [tokens[i] for i in ids], [logprobs[i] for i in ids], in_flight


def test_async_steps_give_the_synchronous_outputs(checkpoint):
    """Greedy, seeded and logprobs requests together: steps with a logprobs request read their tokens back at
    once, the others one step late; every token and logprob equals the synchronous engine's."""
    params = [SamplingParams(max_tokens=9, **GREEDY), SamplingParams(max_tokens=4, logprobs=2, **GREEDY),
              SamplingParams(max_tokens=12, temperature=0.8, seed=5)]
    prompts = ["The quick", "Hello there", "To be"]
    runs = [run_steps(LLM(checkpoint("v3"), device="cpu", dtype="float32", progress=False,
                          async_scheduling=a).engine, prompts, params) for a in (False, True)]
    assert runs[0][:2] == runs[1][:2]
    assert len(runs[1][1][1]) == 4 and not runs[0][2] and runs[1][2]


@pytest.mark.parametrize("prompt, params, message", [
    ([], SamplingParams(), "the prompt is empty"),
    ([0, 99999], SamplingParams(), "prompt token ids must be integers in [0, 320)"),
    ("x " * 200, SamplingParams(), "the context holds 64"),
    ("Hello", SamplingParams(max_tokens=10**6), "lower max_tokens"),
])
def test_bad_requests(prompt, params, message, checkpoint):
    llm = LLM(checkpoint("v3"), device="cpu", dtype="float32", progress=False, max_model_len=64,
              cpu_cache_gib=3e-6, page_size=4)
    with pytest.raises(ValueError) as e:
        llm.generate([prompt], params)
    assert message in str(e.value)
    assert not llm.engine.has_unfinished()


def test_fused_moe_engine_equals_expert_loop(checkpoint):
    """The fused Triton MoE (interpreter on CPU) through the whole engine gives the per-expert loop's tokens."""
    prompts = [[0] + list(range(20, 20 + n)) for n in (3, 11)]
    params = SamplingParams(max_tokens=6, **GREEDY)
    device = "cuda" if torch.cuda.is_available() else "cpu"      # the kernel compiled on a GPU, interpreted on CPU
    runs = [LLM(checkpoint("v2"), device=device, dtype="float32", progress=False, moe_backend=b).generate(
        prompts, params) for b in ("torch", "triton")]
    assert [o.token_ids for o in runs[0]] == [o.token_ids for o in runs[1]]
