"""The Python API: input forms, output order, chat through the template, chunked logits, and ValueErrors."""

import pytest
import torch

from dsinfer import LLM, EngineConfig, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint("v3"), device="cpu", dtype="float32", progress=False)


def test_prompt_forms_and_order(llm):
    ids = llm.tokenizer.encode("The quick")
    assert ids[0] == llm.tokenizer.bos_id and ids.count(llm.tokenizer.bos_id) == 1
    single = llm.generate("The quick", GREEDY)
    as_ids = llm.generate(ids, GREEDY)
    mixed = llm.generate(["Hello", ids, "To be"], GREEDY)
    assert single[0].token_ids == as_ids[0].token_ids == mixed[1].token_ids
    assert mixed[0].token_ids == llm.generate("Hello", GREEDY)[0].token_ids
    assert mixed[1].prompt_token_ids == ids
    assert all(len(o.token_ids) == 8 and o.finish_reason == "length" for o in mixed)
    assert mixed[2].text == llm.tokenizer.decode(mixed[2].token_ids)


def test_chat_uses_the_template(llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    reply = llm.chat(messages, GREEDY)
    rendered = llm.tokenizer.encode_chat(messages)
    assert llm.tokenizer.decode(rendered, skip_special_tokens=False).endswith("<｜User｜>Hello<｜Assistant｜>")
    assert reply.prompt_token_ids == rendered
    assert reply.token_ids == llm.generate([rendered], GREEDY)[0].token_ids
    both = llm.chat([messages, [{"role": "user", "content": "Hi"}]], GREEDY)
    assert both[0].token_ids == reply.token_ids and len(both) == 2
    thinking = llm.tokenizer.encode_chat(messages, thinking=True)
    assert llm.tokenizer.decode(thinking, skip_special_tokens=False).endswith("<｜Assistant｜><think>")


def test_logits_chunked_equals_unchunked(checkpoint, llm):
    ids = [0] + list(range(10, 80))
    small = LLM(checkpoint("v3"), device="cpu", dtype="float32", progress=False, max_num_batched_tokens=16)
    a, b = llm.logits(ids), small.logits(ids)
    assert a.shape == (71, 320) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert (a - b).abs().max().item() < 1e-5


@pytest.mark.parametrize("call, message", [
    (lambda llm: llm.generate([], GREEDY), "prompts must be"),
    (lambda llm: llm.generate(["a", "b"], [GREEDY]), "got 1 sampling params for 2 prompts"),
    (lambda llm: llm.chat([{"content": "x"}]), "needs a 'role'"),
    (lambda llm: llm.logits([]), "empty"),
])
def test_api_errors(call, message, llm):
    with pytest.raises(ValueError) as e:
        call(llm)
    assert message in str(e.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype="int8"), "unknown dtype 'int8'"),
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(page_size=0), "page_size must be in [1, 1024]"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
    (dict(max_model_len=1), "max_model_len must be at least 2"),
    (dict(attn_impl="flash"), "choose absorb or naive"),
])
def test_engine_config_errors(kwargs, message):
    with pytest.raises(ValueError) as e:
        EngineConfig(**kwargs)
    assert message in str(e.value)


def test_max_model_len_beyond_model(checkpoint):
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        LLM(checkpoint("v3"), device="cpu", progress=False, max_model_len=10**7)
