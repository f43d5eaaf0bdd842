"""The scheduler through the engine on a tiny V3 checkpoint. The oracle is each request run alone with a roomy
cache and no prefix caching: batching, chunking, prefix hits and preemption must not change a single token."""

import pytest
import torch

from dsinfer import LLM, SamplingParams


def requests(n, seed=0, prefix=()):
    g = torch.Generator().manual_seed(seed)
    prompts = [[0] + list(prefix) + torch.randint(7, 320, (int(k),), generator=g).tolist()
               for k in torch.randint(1, 40, (n,), generator=g)]
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=int(m))
              for m in torch.randint(1, 16, (n,), generator=g)]
    return prompts, params


@pytest.fixture(scope="module")
def alone(checkpoint):
    llm = LLM(checkpoint("v3"), device="cpu", dtype="float32", progress=False, enable_prefix_caching=False)
    return lambda prompts, params: [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]


def check_all_free(llm):
    bm = llm.engine.block_manager
    assert bm.num_free_pages == bm.num_pages and not llm.engine.has_unfinished()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_40_mixed_requests(checkpoint, alone, async_scheduling):
    llm = LLM(checkpoint("v3"), device="cpu", dtype="float32", progress=False, page_size=4, max_num_seqs=8,
              max_num_batched_tokens=32, async_scheduling=async_scheduling)
    prompts, params = requests(40)
    assert [o.token_ids for o in llm.generate(prompts, params)] == alone(prompts, params)
    check_all_free(llm)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_shared_prefix_hits_the_cache(checkpoint, alone, async_scheduling):
    llm = LLM(checkpoint("v3"), device="cpu", dtype="float32", progress=False, page_size=4,
              async_scheduling=async_scheduling)
    system = list(range(100, 121))                     # 1 BOS + 21 tokens: 5 full pages of 4
    prompts, params = requests(6, seed=1, prefix=system)
    first = llm.generate(prompts[:1], params[:1])      # fills the cache with the prefix
    bm = llm.engine.block_manager
    assert bm.num_hit_tokens == 0
    rest = llm.generate(prompts[1:], params[1:])
    assert bm.num_hit_tokens == 5 * 20                 # each later request reuses the 5 prefix pages
    assert [o.token_ids for o in first + rest] == alone(prompts, params)
    check_all_free(llm)


def test_chat_history_reuses_pages(checkpoint):
    llm = LLM(checkpoint("v3"), device="cpu", dtype="float32", progress=False, page_size=4)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    turn1 = [{"role": "user", "content": "To be, or not to be, that is the question."}]
    reply = llm.chat(turn1, params)
    before = llm.engine.block_manager.num_hit_tokens
    turn2 = turn1 + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "Hello"}]
    llm.chat(turn2, params)
    assert llm.engine.block_manager.num_hit_tokens - before >= 4 * (len(reply.prompt_token_ids) // 4) - 4


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preemption_keeps_every_token(checkpoint, alone, async_scheduling):
    llm = LLM(checkpoint("v3"), device="cpu", dtype="float32", progress=False, page_size=4, max_num_seqs=8,
              cpu_cache_gib=14 * 1920 / 2**30,       # 14 pages of 4 tokens (1920 bytes a page)
              async_scheduling=async_scheduling)
    assert llm.engine.block_manager.num_pages == 14
    prompts, params = requests(12, seed=2)
    prompts = [p[:30] for p in prompts]
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=20) for _ in prompts]
    outs = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == alone(prompts, params)
    check_all_free(llm)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_seeded_sampling_survives_preemption(checkpoint, async_scheduling):
    roomy = LLM(checkpoint("v3"), device="cpu", dtype="float32", progress=False, page_size=4)
    tight = LLM(checkpoint("v3"), device="cpu", dtype="float32", progress=False, page_size=4,
                cpu_cache_gib=12 * 1920 / 2**30, async_scheduling=async_scheduling)
    prompts = [[0] + list(range(10 + i, 30 + i)) for i in range(6)]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=20, ignore_eos=True) for i in range(6)]
    a = [o.token_ids for o in roomy.generate(prompts, params)]
    b = [o.token_ids for o in tight.generate(prompts, params)]
    assert tight.engine.scheduler.num_preemptions > 0 and a == b


def test_triton_backend_equals_torch_backend(checkpoint, alone):
    """The Triton attention and cache-write kernels inside the engine (interpreter on CPU)."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    llm = LLM(checkpoint("v3"), device=device, dtype="float32", progress=False, page_size=4, attn_backend="triton",
              max_num_batched_tokens=16)
    prompts, params = requests(5, seed=3)
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=6) for _ in prompts]
    assert [o.token_ids for o in llm.generate(prompts, params)] == alone(prompts, params)
