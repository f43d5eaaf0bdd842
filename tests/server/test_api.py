"""The HTTP API through the official openai client. Oracle: the offline LLM over the same model, in this process
(greedy, or the same per-request seeds)."""

import asyncio
import math

import httpx
import openai
import pytest
import torch

from dsinfer import SamplingParams

MESSAGES = [{"role": "user", "content": "Who art thou, and whence comest thou?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, **kw)


def test_models_and_health(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    names = [m.id for m in client.models.list().data]
    assert names == ["shakespeare-v3"]


@pytest.mark.parametrize("prompt", ["ROMEO:", "To be, or not to be", [0, 45, 459, 257]])
def test_completion_greedy_matches_llm(client, llm, prompt):
    want = llm.generate(prompt, greedy(12))[0]
    got = client.completions.create(model="shakespeare-v3", prompt=prompt, max_tokens=12, temperature=0)
    choice = got.choices[0]
    assert choice.text == want.text
    assert choice.finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_completion_many_prompts_in_order(client, llm):
    prompts = ["HAMLET:", "OPHELIA:", "First Clown:"]
    want = [o.text for o in llm.generate(prompts, greedy(6))]
    got = client.completions.create(model="shakespeare-v3", prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == want


def test_completion_stream_matches_llm(client, llm):
    want = llm.generate("MACBETH:", greedy(16))[0]
    stream = client.completions.create(model="shakespeare-v3", prompt="MACBETH:", max_tokens=16, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_stop_string_matches_llm(client, llm):
    want = llm.generate("ROMEO:", greedy(30, stop=("e",)))[0]
    got = client.completions.create(model="shakespeare-v3", prompt="ROMEO:", max_tokens=30, temperature=0, stop="e")
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "stop"


def test_chat_greedy_matches_llm(client, llm):
    want = llm.chat(MESSAGES, greedy(16))
    got = client.chat.completions.create(model="shakespeare-v3", messages=MESSAGES, max_completion_tokens=16,
                                         temperature=0)
    assert got.choices[0].message.content == want.text
    assert got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.token_ids)


def test_chat_stream_matches_llm(client, llm):
    want = llm.chat(MESSAGES, greedy(16))
    chunks = list(client.chat.completions.create(model="shakespeare-v3", messages=MESSAGES, max_tokens=16,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_n_with_seed_is_seed_plus_index(client, llm):
    kw = dict(model="shakespeare-v3", prompt="KING LEAR:", max_tokens=8, temperature=1.0, top_p=0.9, seed=41, n=3)
    got = client.completions.create(**kw)
    want = [llm.generate("KING LEAR:", SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=41 + i))[0].text
            for i in range(3)]
    assert [c.text for c in got.choices] == want
    assert len(set(want)) > 1
    assert [c.text for c in client.completions.create(**kw).choices] == want          # reproducible


def test_chat_thinking_goes_to_reasoning_content(client, llm):
    # The bundled template ignores `thinking`, and the model never writes </think>: everything is reasoning.
    want = llm.chat(MESSAGES, greedy(10))
    got = client.chat.completions.create(model="shakespeare-v3", messages=MESSAGES, max_tokens=10, temperature=0,
                                         extra_body={"chat_template_kwargs": {"thinking": True}})
    message = got.choices[0].message
    assert message.reasoning_content == want.text and message.content == ""
    chunks = list(client.chat.completions.create(model="shakespeare-v3", messages=MESSAGES, max_tokens=10,
                                                 temperature=0, stream=True,
                                                 extra_body={"chat_template_kwargs": {"thinking": True}}))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == want.text
    assert "".join(d.content or "" for d in deltas) == ""


def test_chat_logprobs_match_log_softmax(client, llm):
    got = client.chat.completions.create(model="shakespeare-v3", messages=MESSAGES, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=3)
    want = llm.chat(MESSAGES, greedy(6))
    ids = want.prompt_token_ids + want.token_ids
    oracle = torch.log_softmax(llm.logits(ids[:-1]), dim=-1)[len(want.prompt_token_ids) - 1:]
    content = got.choices[0].logprobs.content
    assert len(content) == len(want.token_ids)
    for pos, (entry, token) in enumerate(zip(content, want.token_ids)):
        assert math.isclose(entry.logprob, oracle[pos, token].item(), abs_tol=1e-4)
        assert len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(oracle[pos].topk(3).values.tolist(),
                                                                        abs=1e-4)
        assert entry.token == llm.tokenizer.decode([token], skip_special_tokens=False)


def test_completion_logprobs_legacy_shape(client, llm):
    got = client.completions.create(model="shakespeare-v3", prompt="ROMEO:", max_tokens=5, temperature=0, logprobs=2)
    want = llm.generate("ROMEO:", greedy(5))[0]
    lp = got.choices[0].logprobs
    assert "".join(lp.tokens) == want.text == got.choices[0].text
    oracle = torch.log_softmax(llm.logits(want.prompt_token_ids + want.token_ids[:-1]), dim=-1)
    oracle = oracle[len(want.prompt_token_ids) - 1:]
    assert lp.token_logprobs == pytest.approx([oracle[i, t].item() for i, t in enumerate(want.token_ids)], abs=1e-4)
    assert all(len(d) <= 2 for d in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_sixty_four_concurrent_streams(server, llm):
    prompts = [f"Scene {i}. Enter a messenger." for i in range(64)]
    want = [o.text for o in llm.generate(prompts, greedy(8))]

    async def one(client, prompt):
        stream = await client.completions.create(model="shakespeare-v3", prompt=prompt, max_tokens=8, temperature=0,
                                                 stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                                      timeout=300) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    assert asyncio.run(main()) == want


@pytest.mark.parametrize("kwargs, status, param", [
    (dict(model="gpt-4"), 404, "model"),
    (dict(max_tokens=5000), 400, "max_tokens"),
    (dict(prompt="word " * 2000), 400, "prompt"),
    (dict(temperature=-0.5), 400, None),
    (dict(top_p=0), 400, None),
    (dict(extra_body={"top_k": -7}), 400, None),
    (dict(n=0), 400, "n"),
    (dict(logprobs=6), 400, "logprobs"),
])
def test_bad_requests_are_openai_errors(client, kwargs, status, param):
    body = dict(model="shakespeare-v3", prompt="ROMEO:", max_tokens=4) | kwargs
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(**body)
    assert info.value.status_code == status
    error = info.value.response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_metrics_exposes_the_named_metrics(server, client):
    long_prompt = "Now is the winter of our discontent " * 12          # > one 64-token page: a prefix-cache hit
    for _ in range(2):
        client.completions.create(model="shakespeare-v3", prompt=long_prompt, max_tokens=1)
    text = httpx.get(server.url + "/metrics").text
    for name in ("dsinfer_requests_total{endpoint=\"/v1/completions\",status=\"200\"}", "dsinfer_prompt_tokens_total",
                 "dsinfer_generation_tokens_total", "dsinfer_num_requests_running", "dsinfer_num_requests_waiting",
                 "dsinfer_kv_cache_usage", "dsinfer_prefix_cache_hit_rate",
                 "dsinfer_time_to_first_token_seconds_bucket", "dsinfer_inter_token_latency_seconds_bucket"):
        assert name in text
    m = server.metrics()
    assert m["dsinfer_generation_tokens_total"] > 0 and m["dsinfer_time_to_first_token_seconds_count"] > 0
    assert 0 < m["dsinfer_prefix_cache_hit_rate"] <= 1
