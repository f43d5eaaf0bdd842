"""A server with --api-key and --max-concurrent-requests 2: the key is enforced everywhere but /health, the third
concurrent request gets 429, and SIGTERM during a stream ends the process with status 0."""

import signal

import httpx
import openai
import pytest
from serverproc import serve

KEY = "sk-test-0123"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    with serve(tmp_path_factory.mktemp("keyed"), "--api-key", KEY, "--max-concurrent-requests", "2",
               "--served-model-name", "bard") as s:
        yield s


AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("GET", "/metrics"),
                                          ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}], ids=["none", "wrong", "no-scheme", "basic"])
def test_requests_without_the_key_get_401(keyed, method, path, headers):
    r = httpx.request(method, keyed.url + path, headers=headers, json={"prompt": "x", "max_tokens": 1})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_health_is_open_and_the_key_works(keyed):
    assert httpx.get(keyed.url + "/health").status_code == 200
    client = openai.OpenAI(base_url=keyed.base_url, api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["bard"]
    out = client.completions.create(model="bard", prompt="ROMEO:", max_tokens=2)
    assert out.usage.completion_tokens == 2
    assert httpx.get(keyed.url + "/metrics", headers=AUTH).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.base_url, api_key="nope", max_retries=0).models.list()


def test_third_concurrent_request_gets_429(keyed):
    body = {"prompt": "HAMLET:", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60, headers=AUTH) as client:
        streams = [client.stream("POST", keyed.url + "/v1/completions", json=body) for _ in range(2)]
        for s in streams:
            assert s.__enter__().status_code == 200
        r = client.post(keyed.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        for s in streams:
            s.__exit__(None, None, None)
    for _ in range(100):                       # the slots come back once the server sees the drops
        r = httpx.post(keyed.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=AUTH)
        if r.status_code == 200:
            break
    assert r.status_code == 200


def test_sigterm_mid_stream_exits_zero(keyed):
    body = {"prompt": "HAMLET:", "max_tokens": 30, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60, headers=AUTH) as client:
        with client.stream("POST", keyed.url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            keyed.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]     # graceful: the running request finishes
        assert rest[-1] == "data: [DONE]"
    assert keyed.proc.wait(60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(keyed.url + "/health")
