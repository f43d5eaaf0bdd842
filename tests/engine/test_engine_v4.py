"""DeepSeek-V4 through the paged engine (state slots + pages of compressed entries) against the oracle: the
model's plain per-sequence path, one sequence at a time, greedy. The tiny V4 model has window 16, CSA ratio 4
(indexer top-4) and HCA ratio 8; prompts of 1..70 tokens and small prefill chunks cross window, compression and
page boundaries, including pages smaller than the HCA ratio.

Greedy tokens are compared with the QAT simulation off: its FP8 rounding turns float32 noise of different batch
shapes (1e-6) into whole FP8 steps, so batched and alone may then legitimately differ. With it on, scoring in the
oracle's own chunks must match exactly."""

import fixtures
import pytest
import torch

from dsinfer import EngineConfig, SamplingParams
from dsinfer.checkpoint.loader_v4 import load_model_v4
from dsinfer.engine import Engine
from dsinfer.engine.v4_cache import v4_cache_bytes
from dsinfer.models.v4_compressor import Compressor

LENGTHS = [1, 3, 8, 15, 17, 24, 33, 70]
MAX_TOKENS = 10


def prompt(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, fixtures.VOCAB, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def model_args(checkpoint):
    return load_model_v4(checkpoint("v4"), torch.float32, torch.device("cpu"), simulate_qat=False, progress=False)


@pytest.fixture(scope="module")
def prompts():
    return [prompt(n, i) for i, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def oracle(model_args, prompts):
    """Greedy continuations of each prompt, alone, on the plain per-sequence path."""
    model, _ = model_args
    outs = []
    with torch.inference_mode():
        for p in prompts:
            state, ids, new = model.new_state(), list(p), []
            for _ in range(MAX_TOKENS):
                h = model(torch.tensor(ids), [state], [len(ids)])
                ids = [int(model.compute_logits(h[-1:]).argmax(-1))]
                new += ids
            outs.append(new)
    return outs


def engine(model_args, **kw):
    model, args = model_args
    kw = dict(device="cpu", dtype="float32", enable_prefix_caching=False, progress=False) | kw
    return Engine.from_model(model, args, EngineConfig(**kw))


def drain(eng, ids):
    outs = {i: [] for i in ids}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.seq_id] += o.new_token_ids
    return [outs[i] for i in ids]


def assert_all_released(eng):
    bm = eng.block_manager
    assert bm.num_free_pages == bm.num_pages and len(bm.free_slots) == eng.cache.num_slots


@pytest.mark.parametrize("page_size,max_num_batched_tokens,async_scheduling",
                         [(8, 24, False), (4, 7, False), (16, 1000, False), (8, 24, True)])
def test_concurrent_requests_match_the_plain_model(model_args, prompts, oracle, page_size, max_num_batched_tokens,
                                                   async_scheduling):
    eng = engine(model_args, page_size=page_size, max_num_batched_tokens=max_num_batched_tokens,
                 async_scheduling=async_scheduling)
    ids = [eng.add_request(p, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)) for p in prompts]
    assert drain(eng, ids) == oracle
    assert_all_released(eng)


def test_triton_kernels_in_the_engine_match_the_plain_model(model_args, prompts, oracle):
    """V4's attention-side kernels (interpreter on CPU) on the engine's slot-and-page state, batched: prompts of
    3, 15, 24 and 70 tokens (windows fill, entries complete, the indexer chooses) in chunks of up to 24."""
    pytest.importorskip("triton")
    eng = engine(model_args, page_size=8, max_num_batched_tokens=24, attn_backend="triton")
    assert eng.model.layers[1].attn.attn_backend == "triton"
    fused = [m.wkv_gate is not None for m in eng.model.modules() if isinstance(m, Compressor)]
    assert fused and all(fused)                   # each compressor's wkv and wgate as one projection
    ids = [eng.add_request(p, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
           for p in prompts[1::2]]
    assert drain(eng, ids) == oracle[1::2]
    assert_all_released(eng)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preemption_and_slot_reuse_keep_tokens(model_args, prompts, oracle, async_scheduling):
    """Few pages (the longest request alone nearly fills them) and three slots for eight requests."""
    _, args = model_args
    per_page, per_slot = v4_cache_bytes(args, 8, torch.float32)
    pages = -(-(70 + MAX_TOKENS) // 8) + 2
    eng = engine(model_args, page_size=8, max_num_seqs=3, max_num_batched_tokens=20,
                 cpu_cache_gib=(per_slot * 4 + per_page * pages) / 2**30, async_scheduling=async_scheduling)
    assert eng.block_manager.num_pages == pages and eng.cache.num_slots == 4
    ids = [eng.add_request(p, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
           for p in reversed(prompts)]
    assert drain(eng, ids) == oracle[::-1]
    assert eng.scheduler.num_preemptions > 0
    assert_all_released(eng)


def test_abort_frees_the_slot_and_others_continue(model_args, prompts, oracle):
    eng = engine(model_args, page_size=8, max_num_batched_tokens=32)
    ids = [eng.add_request(p, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
           for p in prompts[3:6]]
    got = {i: [] for i in ids}
    for _ in range(4):
        for o in eng.step():
            got[o.seq_id] += o.new_token_ids
    eng.abort(ids[1])                        # mid-generation
    assert eng.sequences[ids[1]].finish_reason == "abort"
    assert len(eng.block_manager.free_slots) == eng.cache.num_slots - 2
    late = eng.add_request(prompts[7], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    got[late] = []
    while eng.has_unfinished():
        for o in eng.step():
            got[o.seq_id] += o.new_token_ids
    assert got[ids[0]] == oracle[3] and got[ids[2]] == oracle[5] and got[late] == oracle[7]
    assert oracle[4][:len(got[ids[1]])] == got[ids[1]]
    assert_all_released(eng)


@pytest.mark.parametrize("page_size", [4, 16])
def test_scoring_with_qat_equals_the_plain_model_in_the_same_chunks(model_args, prompts, page_size):
    model, _ = model_args
    eng = engine(model_args, page_size=page_size, max_num_batched_tokens=16)
    ids, state = prompts[-1], model.new_state()
    model.set_simulate_qat(True)
    try:
        got = torch.cat(list(eng.iter_logits(ids)))
        with torch.inference_mode():
            want = torch.cat([model.compute_logits(model(torch.tensor(ids[i:i + 16]), [state], [len(ids[i:i + 16])]))
                              for i in range(0, len(ids), 16)])
    finally:
        model.set_simulate_qat(False)
    assert torch.equal(got, want)
    assert_all_released(eng)


def test_prefix_caching_and_tensor_parallel_are_refused(model_args, checkpoint):
    with pytest.raises(ValueError, match="prefix caching is not supported for DeepSeek-V4"):
        engine(model_args, enable_prefix_caching=True)
    with pytest.raises(ValueError, match="tensor_parallel_size 1"):
        Engine(checkpoint("v4"), EngineConfig(device="cpu", tensor_parallel_size=2, progress=False))


@pytest.mark.parametrize("page_size", [4, 8, 16])
def test_cache_bytes_are_what_the_budget_counts(model_args, page_size):
    """The cache allocates what v4_cache_bytes prices (pages and slots, plus one scratch page and slot); the ring and
    entry views of each layer's pool are not counted twice."""
    from dsinfer.engine.v4_cache import V4Cache
    _, args = model_args
    per_page, per_slot = v4_cache_bytes(args, page_size, torch.float32)
    cache = V4Cache(args, 5, page_size, 3, torch.float32, torch.device("cpu"))
    allocated = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for layer in cache.layers
                 for group in layer.values() for t in group.values()}
    assert cache.nbytes == sum(allocated.values()) == per_page * 6 + per_slot * 4
