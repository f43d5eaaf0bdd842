"""Malformed requests (hypothesis) get 4xx and the server keeps serving; clients that vanish mid-request leave
no running sequences and no KV-cache pages behind (read back from /metrics)."""

import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True)

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)

# For each known field, values that are never valid for it.
not_int = json_values.filter(lambda v: not isinstance(v, int) or isinstance(v, bool))
BAD_FIELDS = {
    "max_tokens": not_int.filter(lambda v: v is not None) | st.integers(-10**6, 0) | st.integers(1025, 2**70),
    "temperature": st.text(max_size=4) | st.floats(100.01, 1e300) | st.floats(-1e300, -1e-9) | st.booleans(),
    "top_p": st.floats(1.0001, 1e9) | st.floats(-1e9, 0) | st.text(max_size=3) | st.lists(st.integers(), max_size=2),
    "top_k": st.integers(-10**9, -2) | st.floats(0.5, 0.9) | st.text(max_size=3),
    "n": st.integers(-10, 0) | st.integers(129, 10**6) | st.text(max_size=3),
    "seed": st.integers(-2**70, -1) | st.integers(2**63, 2**70) | st.text(max_size=3) | st.floats(0.1, 0.9),
    "stop": st.just("") | st.integers() | st.lists(st.integers() | st.just(""), min_size=1, max_size=3),
    "stream": st.text(min_size=1, max_size=3) | st.integers(2, 9) | st.lists(st.booleans(), max_size=2),
    "model": st.text(min_size=1, max_size=8).filter(lambda s: s != "shakespeare-v3") | st.integers(),
    "logprobs": st.integers(6, 10**6) | st.integers(-10**6, -1) | st.text(max_size=3),
    "prompt": st.just([]) | st.integers() | st.dictionaries(st.text(max_size=3), json_scalars, max_size=2) |
              st.lists(st.integers(8192, 2**40), min_size=1, max_size=3) | st.lists(st.floats(0.1, 0.9), min_size=1),
    "stream_options": st.text(max_size=3) | st.integers() | st.just({"include_usage": "yes"}),
}
CHAT_BAD_FIELDS = {
    "messages": st.just([]) | st.text(max_size=5) | st.lists(st.integers(), min_size=1, max_size=2) |
                st.just([{"content": "no role"}]) | st.just([{"role": "wizard", "content": "x"}]) |
                st.just([{"role": "user", "content": 5}]),
    "top_logprobs": st.integers(21, 10**6) | st.integers(-10**6, -1),
    "logprobs": st.text(min_size=1, max_size=3) | st.integers(2, 9),
    "chat_template_kwargs": st.text(max_size=3) | st.lists(st.integers(), max_size=2),
    "max_completion_tokens": st.integers(-10**6, 0) | st.text(max_size=3),
}


def post(server, path: str, body, content_type: str = "application/json") -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=data, headers={"content-type": content_type}, timeout=60)


def assert_openai_4xx(r: httpx.Response):
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["type"] and "param" in error and "code" in error


@settings(max_examples=60, **SETTINGS)
@given(st.data())
def test_fuzzed_fields_get_4xx(server, data):
    chat = data.draw(st.booleans())
    fields = {**BAD_FIELDS, **CHAT_BAD_FIELDS} if chat else BAD_FIELDS
    if chat:
        fields = {k: v for k, v in fields.items() if k != "prompt"}
    name = data.draw(st.sampled_from(sorted(fields)))
    body = {"model": "shakespeare-v3", "max_tokens": 2}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "ROMEO:"}
    body[name] = data.draw(fields[name])
    assert_openai_4xx(post(server, "/v1/chat/completions" if chat else "/v1/completions", body))


@settings(max_examples=40, **SETTINGS)
@given(body=st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_junk_bodies_get_4xx(server, body, content_type, path):
    assert_openai_4xx(post(server, path, body, content_type))


def test_still_serving_after_the_fuzz(server):
    r = post(server, "/v1/completions", {"prompt": "ROMEO:", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert server.proc.poll() is None
    assert "Traceback" not in server.log_text()


def wait_until_idle(server, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        idle = (m["dsinfer_num_requests_running"] == 0 and m["dsinfer_num_requests_waiting"] == 0
                and m["dsinfer_kv_cache_usage"] == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def test_dropped_streams_free_their_pages(server):
    body = {"prompt": "HAMLET:", "max_tokens": 1000, "ignore_eos": True, "stream": True, "temperature": 0.8}
    before = server.metrics()["dsinfer_generation_tokens_total"]
    with httpx.Client(timeout=60) as client:
        streams = [client.stream("POST", server.url + "/v1/completions", json=body | {"seed": i}) for i in range(8)]
        for s in streams:
            response = s.__enter__()
            assert response.status_code == 200
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data:"))          # generation has started
        assert server.metrics()["dsinfer_num_requests_running"] > 0
        for s in streams:
            s.__exit__(None, None, None)                                        # drop the connection
    m = wait_until_idle(server)
    state = (m["dsinfer_num_requests_running"], m["dsinfer_num_requests_waiting"], m["dsinfer_kv_cache_usage"])
    assert state == (0, 0, 0)
    assert m["dsinfer_generation_tokens_total"] - before < 8 * 1000          # aborted, not run to the end


def test_dropped_non_streaming_request_is_aborted(server):
    body = {"prompt": "OTHELLO:", "max_tokens": 1000, "ignore_eos": True}
    before = server.metrics()["dsinfer_generation_tokens_total"]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, timeout=1.5)
    m = wait_until_idle(server)
    assert (m["dsinfer_num_requests_running"], m["dsinfer_kv_cache_usage"]) == (0, 0)
    assert m["dsinfer_generation_tokens_total"] - before < 1000               # aborted, not run to the end
