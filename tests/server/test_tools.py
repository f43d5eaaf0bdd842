"""Tool calling in /v1/chat/completions.

The parser is checked against hand-written expected calls (V3, V3.1, V4 DSML) and, for streaming, against its own
whole-text answer for every way of cutting the text. The HTTP path runs a real engine over a tiny V3 checkpoint
whose sampler is replaced by a script, so the model "writes" a chosen completion token by token (a random tiny
model never emits tool calls); the official openai client reads the answers.
"""

from __future__ import annotations

import json

import fixtures
import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from dsinfer.config import EngineConfig
from dsinfer.engine import Engine
from dsinfer.server.app import create_app
from dsinfer.server.tool_calls import ToolCallParser, split_tool_calls

B, E = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CB, CE, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
D = "｜DSML｜"

V3_TEXT = (f"Let me look.{B}{CB}function{SEP}get_weather\n```json\n{{\"city\": \"Paris\"}}\n```{CE}\n"
           f"{CB}function{SEP}get_time\n```json\n{{\"tz\": \"CET\", \"24h\": true}}\n```{CE}{E}")
V31_TEXT = f"{B}{CB}get_weather{SEP}{{\"city\": \"東京\", \"days\": [1, 2]}}{CE}{CB}ping{SEP}{{}}{CE}{E}"
V4_TEXT = (f"Sure.\n\n<{D}tool_calls>\n<{D}invoke name=\"get_weather\">\n"
           f"<{D}parameter name=\"city\" string=\"true\">Paris</{D}parameter>\n"
           f"<{D}parameter name=\"days\" string=\"false\">3</{D}parameter>\n</{D}invoke>\n"
           f"<{D}invoke name=\"ping\">\n\n</{D}invoke>\n</{D}tool_calls>")

EXPECTED = {  # fmt, text -> content, [(name, arguments as a JSON object)]
    "v3": ("deepseek_v3", V3_TEXT, "Let me look.",
           [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET", "24h": True})]),
    "v3.1": ("deepseek_v3", V31_TEXT, "", [("get_weather", {"city": "東京", "days": [1, 2]}), ("ping", {})]),
    "v4": ("deepseek_v4", V4_TEXT, "Sure.", [("get_weather", {"city": "Paris", "days": 3}), ("ping", {})]),
    "v3-none": ("deepseek_v3", "no calls <｜tool here", "no calls <｜tool here", []),
    "v4-none": ("deepseek_v4", "plain\n\nanswer", "plain\n\nanswer", []),
}


def summary(calls: list[dict]) -> list[tuple[str, dict]]:
    for c in calls:
        assert c["type"] == "function" and c["id"].startswith("call_")
    assert len({c["id"] for c in calls}) == len(calls)
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("case", list(EXPECTED))
def test_parse_whole_text(case):
    fmt, text, content, calls = EXPECTED[case]
    got_content, got_calls = split_tool_calls(text, fmt)
    assert got_content == content
    assert summary(got_calls) == calls


@pytest.mark.parametrize("case", list(EXPECTED))
def test_every_two_piece_cut_gives_the_whole_text_answer(case):
    fmt, text, content, calls = EXPECTED[case]
    for cut in range(len(text) + 1):
        parser = ToolCallParser(fmt)
        streamed = parser.feed(text[:cut]) + parser.feed(text[cut:])
        rest, got = parser.flush()
        assert (streamed + rest, summary(got)) == (content, calls), cut


@pytest.mark.parametrize("fmt, marker", [("deepseek_v3", B), ("deepseek_v4", f"\n\n<{D}tool_calls")])
def test_stream_holds_back_a_possible_marker_only(fmt, marker):
    parser = ToolCallParser(fmt)
    assert parser.feed("abc" + marker[:4]) == "abc"
    assert parser.feed("x") == marker[:4] + "x"        # it was not the marker after all
    assert parser.feed("y" + marker + "z") == "y"       # from the marker on nothing is content
    assert parser.feed("more") == ""


MALFORMED = {
    "v3 no calls end": ("deepseek_v3", f"a{B}{CB}function{SEP}f\n```json\n{{}}\n```{CE}"),
    "v3 bad json": ("deepseek_v3", f"{B}{CB}function{SEP}f\n```json\n{{city: 1}}\n```{CE}{E}"),
    "v3 no sep": ("deepseek_v3", f"{B}{CB}f {{}}{CE}{E}"),
    "v3 array args": ("deepseek_v3", f"{B}{CB}f{SEP}[1, 2]{CE}{E}"),
    "v3 empty name": ("deepseek_v3", f"{B}{CB}{SEP}{{}}{CE}{E}"),
    "v3 text after end": ("deepseek_v3", f"{B}{CB}f{SEP}{{}}{CE}{E} and more"),
    "v3 empty block": ("deepseek_v3", f"x{B}{E}"),
    "v3 truncated": ("deepseek_v3", f"x{B}{CB}f{SEP}{{\"a\": "),
    "v4 truncated": ("deepseek_v4", V4_TEXT[:-20]),
    "v4 bad json": ("deepseek_v4", V4_TEXT.replace('string="false">3', 'string="false">three')),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_calls_fall_back_to_plain_content(case):
    fmt, text = MALFORMED[case]
    assert split_tool_calls(text, fmt) == (text, [])


# -- request validation (the bundled model's server) -----------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.mark.parametrize("extra, param, words", [
    ({"tools": WEATHER}, "tools", "list"),
    ({"tools": [{"type": "retrieval", "function": WEATHER["function"]}]}, "tools.0.type", "function"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name", "required"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools.0.function.parameters",
     "dict"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "more than once"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", ""),
    ({"tools": [WEATHER], "tool_choice": "required"}, "tool_choice", "not supported"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice",
     "not supported"),
    ({"tool_choice": "auto"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER], "chat_template_kwargs": {"tools": [WEATHER]}}, "chat_template_kwargs", "twice"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}]},
     "messages.1.tool_calls.0.function.arguments", "string"),
    ({"messages": ASK + [{"role": "tool", "content": "sunny", "tool_call_id": 7}]}, "messages.1.tool_call_id",
     "string"),
])
def test_bad_tool_requests_are_400_naming_the_field(server, extra, param, words):
    body = {"messages": ASK, "max_tokens": 2} | extra
    r = httpx.post(server.base_url + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert words.lower() in error["message"].lower()


@pytest.mark.parametrize("tool_choice", [None, "auto", "none"])
def test_tools_accepted_by_a_template_without_tools(server, tool_choice):
    """The bundled model's template ignores tools; the request still works and its text is content."""
    body = {"messages": ASK, "max_tokens": 4, "temperature": 0, "tools": [WEATHER]}
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    r = httpx.post(server.base_url + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] in ("stop", "length") and isinstance(choice["message"]["content"], str)
    assert "tool_calls" not in choice["message"]


# -- through the app, with a scripted model ---------------------------------------------------------------------

# A V3-style template that also renders tools (V3.1-like system section), assistant tool calls and tool results.
NL = "{{ '\\n' }}"
TOOLS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if tools %}## Tools{% for t in tools %}" + NL + "### {{ t['function']['name'] }}" + NL +
    "Description: {{ t['function']['description'] }}" + NL + "Parameters: {{ t['function']['parameters'] | tojson }}"
    "{% endfor %}" + NL + NL + "{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}{% if m['tool_calls'] %}<｜tool▁calls▁begin｜>"
    "{% for c in m['tool_calls'] %}<｜tool▁call▁begin｜>{{ c['type'] }}<｜tool▁sep｜>{{ c['function']['name'] }}" + NL +
    "```json" + NL + "{{ c['function']['arguments'] }}" + NL + "```<｜tool▁call▁end｜>{% endfor %}<｜tool▁calls▁end｜>"
    "{% endif %}<｜end▁of▁sentence｜>"
    "{% elif m['role'] == 'tool' %}<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{{ m['content'] }}"
    "<｜tool▁output▁end｜><｜tool▁outputs▁end｜>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% if thinking is defined and thinking %}<think>{% endif %}"
    "{% endif %}")


class ScriptedSampler:
    """Stands in for the engine's sampler: each step draws the next token of `script`, then EOS."""

    def __init__(self, eos_id: int):
        self.eos_id, self.script, self.prompts = eos_id, [], []

    def __call__(self, logits, params, generators, vocab_limit=None):
        token = self.script.pop(0) if self.script else self.eos_id
        return torch.full((logits.shape[0],), token, dtype=torch.long)


def scripted_app(src, path, chat_format: str = "jinja"):
    """A real engine over the tiny V3 checkpoint `src` with the tools template (or the V4 encoder), its sampler
    scripted, behind the app; yields (engine, sampler, openai client, http client)."""
    for f in src.iterdir():
        if f.suffix in (".json", ".safetensors") and not f.name.startswith("tokenizer"):
            (path / f.name).symlink_to(f)
    fixtures.write_tokenizer(path, TOOLS_TEMPLATE)
    engine = Engine(path, EngineConfig(device="cpu", dtype="float32", max_model_len=4096, progress=False))
    engine.tokenizer.chat_format = chat_format      # the V4 encoder needs only the tokens this tokenizer has
    sampler = ScriptedSampler(min(engine.tokenizer.eos_ids))
    engine.sampler = sampler
    add_request = engine.add_request

    def recording_add_request(prompt, params=None):
        sampler.prompts.append(prompt)
        return add_request(prompt, params)

    engine.add_request = recording_add_request
    with TestClient(create_app(engine)) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
        yield engine, sampler, client, http


@pytest.fixture(scope="module")
def scripted(checkpoint, tmp_path_factory):
    yield from scripted_app(checkpoint("v3"), tmp_path_factory.mktemp("tools-v3"))


def say(scripted, text: str) -> None:
    engine, sampler = scripted[:2]
    sampler.script = engine.tokenizer.encode(text, add_bos=False)


def test_tools_and_history_reach_the_prompt(scripted):
    engine, sampler, client, _ = scripted
    say(scripted, "ok")
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"}]
    client.chat.completions.create(model=engine_name(scripted), messages=history, tools=[WEATHER], max_tokens=4)
    prompt = engine.tokenizer.decode(sampler.prompts[-1], skip_special_tokens=False)
    schema = json.dumps(WEATHER["function"]["parameters"], ensure_ascii=False)
    assert prompt == (f"{fixtures.BOS}## Tools\n### get_weather\nDescription: Weather of a city.\nParameters: {schema}"
                      f"\n\n<｜User｜>Weather in Paris?<｜Assistant｜>{B}{CB}function{SEP}get_weather\n```json\n"
                      f"{{\"city\": \"Paris\"}}\n```{CE}{E}{fixtures.EOS}<｜tool▁outputs▁begin｜>"
                      f"<｜tool▁output▁begin｜>sunny, 21C<｜tool▁output▁end｜><｜tool▁outputs▁end｜><｜Assistant｜>")
    client.chat.completions.create(model=engine_name(scripted), messages=ASK, tools=[WEATHER], tool_choice="none",
                                   max_tokens=2)
    assert "## Tools" not in engine.tokenizer.decode(sampler.prompts[-1], skip_special_tokens=False)


def engine_name(scripted) -> str:
    return scripted[2].models.list().data[0].id


@pytest.mark.parametrize("case", ["v3", "v3.1"])
def test_tool_calls_answered_whole(scripted, case):
    _, text, content, calls = EXPECTED[case]
    say(scripted, text)
    r = scripted[2].chat.completions.create(model=engine_name(scripted), messages=ASK, tools=[WEATHER])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == (content or None)
    assert summary([c.model_dump() for c in choice.message.tool_calls]) == calls
    assert r.usage.completion_tokens == len(scripted[0].tokenizer.encode(text, add_bos=False)) + 1     # + EOS


def test_tool_calls_streamed(scripted):
    _, text, content, calls = EXPECTED["v3"]
    say(scripted, text)
    chunks = list(scripted[2].chat.completions.create(model=engine_name(scripted), messages=ASK, tools=[WEATHER],
                                                      stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.content or "" for d in deltas) == content
    streamed = [tc for d in deltas for tc in d.tool_calls or []]
    assert [tc.index for tc in streamed] == list(range(len(calls)))
    assert summary([tc.model_dump(exclude={"index"}) for tc in streamed]) == calls
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"


def test_reasoning_then_tool_calls(scripted):
    _, text, _, calls = EXPECTED["v3.1"]
    for stream in (False, True):
        say(scripted, "I should call it.</think>Checking." + text)
        r = scripted[2].chat.completions.create(model=engine_name(scripted), messages=ASK, tools=[WEATHER],
                                                extra_body={"chat_template_kwargs": {"thinking": True}},
                                                stream=stream)
        if stream:
            deltas = [c.choices[0].delta for c in r]
            reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
            content = "".join(d.content or "" for d in deltas)
            got = [tc.model_dump(exclude={"index"}) for d in deltas for tc in d.tool_calls or []]
        else:
            message = r.choices[0].message
            reasoning, content = message.reasoning_content, message.content
            got = [c.model_dump() for c in message.tool_calls]
        assert (reasoning, content, summary(got)) == ("I should call it.", "Checking.", calls)


def test_malformed_calls_come_back_as_content(scripted):
    text = f"Hmm{B}{CB}function{SEP}get_weather\n```json\n{{city}}\n```{CE}{E}"
    say(scripted, text)
    r = scripted[2].chat.completions.create(model=engine_name(scripted), messages=ASK, tools=[WEATHER])
    assert (r.choices[0].message.content, r.choices[0].message.tool_calls) == (text, None)
    assert r.choices[0].finish_reason == "stop"


def test_without_tools_nothing_is_parsed(scripted):
    say(scripted, V3_TEXT)
    r = scripted[2].chat.completions.create(model=engine_name(scripted), messages=ASK)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    assert B not in r.choices[0].message.content                # the engine's text leaves special tokens out


def test_stop_string_with_tools(scripted):
    say(scripted, V3_TEXT)
    r = scripted[2].chat.completions.create(model=engine_name(scripted), messages=ASK, tools=[WEATHER], stop=["look"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("Let me ", "stop")


def test_v4_tools_in_prompt_and_dsml_calls_parsed(checkpoint, tmp_path):
    scripted = next(app := scripted_app(checkpoint("v3"), tmp_path, "deepseek_v4"))
    try:
        engine, sampler, client, _ = scripted
        _, text, content, calls = EXPECTED["v4"]
        for stream in (False, True):
            say(scripted, text)
            r = client.chat.completions.create(model=engine_name(scripted), messages=ASK, tools=[WEATHER],
                                               stream=stream)
            if stream:
                deltas = [c.choices[0].delta for c in r]
                got_content = "".join(d.content or "" for d in deltas)
                got = [tc.model_dump(exclude={"index"}) for d in deltas for tc in d.tool_calls or []]
            else:
                message = r.choices[0].message
                got_content, got = message.content, [c.model_dump() for c in message.tool_calls]
            assert (got_content, summary(got)) == (content, calls)
        prompt = engine.tokenizer.decode(sampler.prompts[-1], skip_special_tokens=False)
        assert prompt.startswith(fixtures.BOS + "\n\n## Tools\n") and json.dumps(WEATHER["function"]) in prompt
    finally:
        app.close()
