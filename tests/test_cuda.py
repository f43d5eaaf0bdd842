"""On a CUDA GPU: the whole engine (Triton attention, cache write, FP8 kernels where present) gives the same
greedy tokens as the CPU reference path. Skipped without a GPU."""

import pytest
import torch

from dsinfer import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name", ["v2-lite", "v3"])
def test_cuda_matches_cpu(name, checkpoint):
    prompts = [[0] + list(range(10, 10 + n)) for n in (1, 17, 70)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    cpu = LLM(checkpoint(name), device="cpu", dtype="float32", progress=False)
    gpu = LLM(checkpoint(name), device="cuda", dtype="float32", progress=False, page_size=16)
    assert [o.token_ids for o in gpu.generate(prompts, params)] == [o.token_ids for o in cpu.generate(prompts, params)]
    ids = prompts[2]
    assert (gpu.logits(ids) - cpu.logits(ids)).abs().max().item() < 1e-3
    # bf16 flips near-tied routing choices of these random models (HF's own bf16 agrees ~0.9 on CPU)
    bf16 = LLM(checkpoint(name), device="cuda", dtype="bfloat16", progress=False)
    agree = (bf16.logits(ids).argmax(-1) == cpu.logits(ids).argmax(-1)).float().mean().item()
    assert agree > 0.75


def decode_logprobs(llm, prompt, steps):
    """The top-3 log-probabilities of `steps` greedy decode steps of one request, through the engine: (steps, 3)."""
    seq = llm.engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, logprobs=3))
    found = []
    while llm.engine.has_unfinished():
        found += [o.logprobs for o in llm.engine.step() if o.seq_id == seq]
    return torch.tensor([[lp for _, lp in t.top] for t in found])


@pytest.mark.parametrize("name", ["v2-lite", "v3"])
def test_cuda_graphs_and_fused_moe_equal_eager_loop(name, checkpoint):
    """Decode replayed from CUDA graphs (padded batches, many buckets) with the fused MoE gives the tokens and
    logits of eager steps with the per-expert loop."""
    g = torch.Generator().manual_seed(0)
    prompts = [[0] + torch.randint(7, 320, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 90, (21,), generator=g)]
    params = [SamplingParams(temperature=0, max_tokens=int(m), ignore_eos=True)
              for m in torch.randint(1, 40, (21,), generator=g)]
    kw = dict(device="cuda", dtype="float32", progress=False, page_size=16, max_num_seqs=13)
    eager = LLM(checkpoint(name), enforce_eager=True, moe_backend="torch", **kw)
    graphs = LLM(checkpoint(name), **kw)
    assert graphs.engine.runner.graphs is not None and eager.engine.runner.graphs is None
    assert [o.token_ids for o in graphs.generate(prompts, params)] == \
        [o.token_ids for o in eager.generate(prompts, params)]
    torch.testing.assert_close(decode_logprobs(graphs, prompts[3], 4), decode_logprobs(eager, prompts[3], 4),
                               atol=1e-4, rtol=1e-4)
    graphs.engine.runner.graphs.release()                 # what a tensor-parallel group does before it is left
    assert not graphs.engine.runner.graphs.can_run(1, 8)
    assert [o.token_ids for o in graphs.generate(prompts[:3], params[:3])] == \
        [o.token_ids for o in eager.generate(prompts[:3], params[:3])]             # eager steps from then on


def test_v4_cuda_graphs_equal_eager_steps(checkpoint, monkeypatch):
    """DeepSeek-V4 decode replayed from CUDA graphs (batch and context buckets, padded rows on the scratch slot)
    with the Triton kernels gives the tokens and logits of eager steps on the torch twins. Ties among the tiny
    model's indexer scores (4 heads all ReLU to 0 for about 1 entry in 16) are broken by index, since torch.topk's
    choice among ties depends on the row's length (tests/engine/test_v4_decode.py)."""
    from fixtures import stable_topk
    monkeypatch.setattr(torch.Tensor, "topk", stable_topk)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 300, (int(n),), generator=g).tolist() for n in torch.randint(1, 90, (13,), generator=g)]
    params = [SamplingParams(temperature=0, max_tokens=int(m), ignore_eos=True)
              for m in torch.randint(1, 40, (13,), generator=g)]
    kw = dict(device="cuda", dtype="float32", progress=False, page_size=16, max_num_seqs=9, simulate_qat=False)
    eager = LLM(checkpoint("v4"), enforce_eager=True, moe_backend="torch", attn_backend="torch", **kw)
    graphs = LLM(checkpoint("v4"), **kw)
    assert graphs.engine.runner.graphs is not None and eager.engine.runner.graphs is None
    assert len(graphs.engine.runner.graphs.contexts) > 1
    assert [o.token_ids for o in graphs.generate(prompts, params)] == \
        [o.token_ids for o in eager.generate(prompts, params)]
    torch.testing.assert_close(decode_logprobs(graphs, prompts[3], 6), decode_logprobs(eager, prompts[3], 6),
                               atol=1e-4, rtol=1e-4)
