"""Logprobs on StepOutput (SamplingParams.logprobs). Oracle: torch.log_softmax of LLM.logits over the prompt plus
the generated tokens (a separate full-sequence prefill, not the decode path that produced them)."""

import pytest
import torch

from dsinfer.sampling import MAX_LOGPROBS, SamplingParams, compute_logprobs


def run(llm, prompt: str, params: SamplingParams):
    engine = llm.engine
    seq_id = engine.add_request(prompt, params)
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.seq_id == seq_id]
    seq = engine.pop(seq_id)
    return seq, outs


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=6, logprobs=0),
    SamplingParams(temperature=0, max_tokens=6, logprobs=5),
    SamplingParams(temperature=0.7, top_k=4, max_tokens=6, seed=3, logprobs=MAX_LOGPROBS),
    SamplingParams(temperature=1.5, top_p=0.5, max_tokens=6, seed=9, logprobs=2),
], ids=["greedy-0", "greedy-5", "temp-topk-20", "topp-2"])
def test_logprobs_match_log_softmax_of_logits(llm, params):
    seq, outs = run(llm, "KING RICHARD:", params)
    assert len(outs) == seq.num_generated
    oracle = torch.log_softmax(llm.logits(seq.token_ids[:-1]), dim=-1)[seq.num_prompt_tokens - 1:]   # (gen, V)
    for pos, out in enumerate(outs):
        lp = out.logprobs
        token = out.new_token_ids[0]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(oracle[pos, token].item(), abs=1e-4)     # raw, not temperature-scaled
        assert len(lp.top) == params.logprobs
        want_vals, want_ids = oracle[pos].topk(params.logprobs)
        assert [v for _, v in lp.top] == pytest.approx(want_vals.tolist(), abs=1e-4)
        assert [t for t, _ in lp.top] == want_ids.tolist()
        if params.greedy and lp.top:
            assert lp.top[0][0] == token


def test_no_logprobs_unless_asked(llm):
    _, outs = run(llm, "ROMEO:", SamplingParams(temperature=0, max_tokens=3))
    assert all(o.logprobs is None for o in outs)


def test_mixed_batch_only_asking_rows_get_logprobs(llm):
    engine = llm.engine
    a = engine.add_request("ROMEO:", SamplingParams(temperature=0, max_tokens=3, logprobs=1))
    b = engine.add_request("JULIET:", SamplingParams(temperature=0, max_tokens=3))
    seen = {a: [], b: []}
    while engine.has_unfinished():
        for o in engine.step():
            seen[o.seq_id].append(o.logprobs)
    engine.pop(a), engine.pop(b)
    assert all(lp is not None and len(lp.top) == 1 for lp in seen[a]) and len(seen[a]) == 3
    assert seen[b] == [None] * 3


def test_compute_logprobs_respects_vocab_limit():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    logits[:, 40:] += 100                              # ids past the limit would dominate if not excluded
    tokens = [1, 7, 39]
    got = compute_logprobs(logits, tokens, [0, 3, 5], vocab_limit=40)
    ref = torch.log_softmax(logits[:, :40], dim=-1)
    for row, (lp, t, k) in enumerate(zip(got, tokens, [0, 3, 5])):
        assert lp.logprob == pytest.approx(ref[row, t].item(), abs=1e-6)
        assert [i for i, _ in lp.top] == ref[row].topk(k).indices.tolist() if k else lp.top == []
        assert all(i < 40 for i, _ in lp.top)


@pytest.mark.parametrize("bad", [-1, MAX_LOGPROBS + 1, 1000])
def test_params_reject_bad_logprobs(bad):
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=bad)
