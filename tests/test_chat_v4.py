"""DeepSeek-V4 message encoding and completion parsing.

Oracles: expected prompt strings written out by hand from the spec (section 4) and from the published reference
encoder (`encoding/encoding_dsv4.py` of the V4 release, read, not run; the two conversations marked "gold" follow its
test files `encoding/tests/test_output_1.txt` and `_2.txt`); round trips encode -> rendered assistant turn ->
parse_completion, compared with the messages that went in.
"""

import json

import fixtures
import pytest

from dsinfer.chat_v4 import encode_messages, parse_completion
from dsinfer.server.reasoning import prompt_opens_thinking, split_reasoning
from dsinfer.tokenizer import Tokenizer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"
SYSTEM = "You are a helpful assistant."

# The fixed texts, typed out from the published encoder (not imported from the module under test).
EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, "
    "rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n")


def tools_section(schemas: str) -> str:
    return ("## Tools\n\n"
            "You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "
            "\"<｜DSML｜tool_calls>\" block like the following:\n\n"
            "<｜DSML｜tool_calls>\n"
            "<｜DSML｜invoke name=\"$TOOL_NAME\">\n"
            "<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE"
            "</｜DSML｜parameter>\n"
            "...\n"
            "</｜DSML｜invoke>\n"
            "<｜DSML｜invoke name=\"$TOOL_NAME2\">\n"
            "...\n"
            "</｜DSML｜invoke>\n"
            "</｜DSML｜tool_calls>\n\n"
            "String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, "
            "booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n"
            "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
            "<think>...</think> BEFORE any tool calls or final response.\n\n"
            "Otherwise, output directly after </think> with tool calls or final response.\n\n"
            "### Available Tool Schemas\n\n"
            f"{schemas}\n\n"
            "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n")


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather for a specific location",
    "parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "The city name"}},
                   "required": ["location"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {}}}}
WEATHER_JSON = ('{"name": "get_weather", "description": "Get the weather for a specific location", "parameters": '
                '{"type": "object", "properties": {"location": {"type": "string", "description": "The city name"}}, '
                '"required": ["location"]}}')
SEARCH_JSON = '{"name": "search", "parameters": {"type": "object", "properties": {}}}'


def call(name, arguments, call_id=None):
    tc = {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
    return tc | ({"id": call_id} if call_id else {})


def dsml(*invokes: str) -> str:
    return "\n\n<｜DSML｜tool_calls>\n" + "\n".join(invokes) + "\n</｜DSML｜tool_calls>"


def invoke(name: str, *params: tuple[str, str, str]) -> str:
    lines = "\n".join(f'<｜DSML｜parameter name="{k}" string="{s}">{v}</｜DSML｜parameter>' for k, s, v in params)
    return f'<｜DSML｜invoke name="{name}">\n{lines}\n</｜DSML｜invoke>'


# -- exact renderings ------------------------------------------------------------------------------------------

GOLD_TOOLS = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What's the weather in Beijing?"},
    {"role": "assistant", "content": "",
     "reasoning_content": "The user wants to know the weather in Beijing. I should use the get_weather tool.",
     "tool_calls": [call("get_weather", {"location": "Beijing", "unit": "celsius"})]},
    {"role": "tool", "content": '{"temperature": 22, "condition": "sunny", "humidity": 45}'},
    {"role": "assistant", "reasoning_content": "Got the weather data. Let me format a nice response.",
     "content": "The weather in Beijing is currently sunny with a temperature of 22°C and 45% humidity."},
]


def test_gold_thinking_with_tools():
    expected = (
        BOS + SYSTEM + "\n\n" + tools_section(WEATHER_JSON)
        + U + "What's the weather in Beijing?" + A
        + "<think>The user wants to know the weather in Beijing. I should use the get_weather tool.</think>"
        + dsml(invoke("get_weather", ("location", "true", "Beijing"), ("unit", "true", "celsius"))) + EOS
        + U + '<tool_result>{"temperature": 22, "condition": "sunny", "humidity": 45}</tool_result>' + A
        + "<think>Got the weather data. Let me format a nice response.</think>"
        + "The weather in Beijing is currently sunny with a temperature of 22°C and 45% humidity." + EOS)
    assert encode_messages(GOLD_TOOLS, "thinking", tools=[WEATHER]) == expected
    # the same tools given on the system message, as the reference's own test does
    assert encode_messages([GOLD_TOOLS[0] | {"tools": [WEATHER]}] + GOLD_TOOLS[1:], "thinking") == expected


GOLD_THINKING = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "reasoning_content": "The user said hello, I should greet back.",
     "content": "Hi there! How can I help you?"},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "reasoning_content": "The user asks about the capital of France. It is Paris.",
     "content": "The capital of France is Paris."},
]


def test_gold_thinking_drops_earlier_reasoning():
    expected = (BOS + SYSTEM + U + "Hello" + A + "</think>Hi there! How can I help you?" + EOS
                + U + "What is the capital of France?" + A
                + "<think>The user asks about the capital of France. It is Paris.</think>"
                + "The capital of France is Paris." + EOS)
    assert encode_messages(GOLD_THINKING, "thinking") == expected


@pytest.mark.parametrize("effort", [None, "high", "max"])
@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_generation_prompt_and_effort(mode, effort):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "1+1=?"}]
    prefix = EFFORT_MAX if (mode, effort) == ("thinking", "max") else ""
    think = "<think>" if mode == "thinking" else "</think>"
    assert encode_messages(messages, mode, reasoning_effort=effort) == BOS + prefix + SYSTEM + U + "1+1=?" + A + think
    assert encode_messages(messages, mode, reasoning_effort=effort, add_generation_prompt=False) == \
        BOS + prefix + SYSTEM + U + "1+1=?"
    assert encode_messages(messages, mode, reasoning_effort=effort, add_default_bos_token=False) == \
        prefix + SYSTEM + U + "1+1=?" + A + think


def test_effort_paragraph_comes_before_everything_even_without_system():
    assert encode_messages([{"role": "user", "content": "q"}], "thinking", reasoning_effort="max") == \
        BOS + EFFORT_MAX + U + "q" + A + "<think>"


def test_chat_mode_history():
    expected = (BOS + SYSTEM + U + "Hello" + A + "</think>Hi there! How can I help you?" + EOS
                + U + "What is the capital of France?" + A + "</think>The capital of France is Paris." + EOS)
    assert encode_messages(GOLD_THINKING, "chat") == expected
    assert encode_messages(GOLD_THINKING[:-1], "chat") == expected[:-len("The capital of France is Paris." + EOS)]


def test_tools_without_system_message_and_response_format():
    messages = [{"role": "user", "content": "find cats"}]
    schema = {"type": "json_object"}
    expected = (BOS + "\n\n" + tools_section(WEATHER_JSON + "\n" + SEARCH_JSON)
                + "\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
                + '{"type": "json_object"}' + U + "find cats" + A + "</think>")
    assert encode_messages(messages, tools=[WEATHER, SEARCH], response_format=schema) == expected
    # bare function schemas are accepted as well as OpenAI's {"type": "function", "function": ...}
    assert encode_messages(messages, tools=[WEATHER["function"], SEARCH["function"]], response_format=schema) == \
        expected


def test_developer_with_tools_and_latest_reminder():
    messages = [{"role": "developer", "content": "Be brief.", "tools": [SEARCH]},
                {"role": "latest_reminder", "content": "Today is Monday."},
                {"role": "user", "content": "Plans?"}]
    expected = (BOS + U + "Be brief.\n\n" + tools_section(SEARCH_JSON) + A + "<think>"
                + "<｜latest_reminder｜>Today is Monday." + U + "Plans?" + A + "<think>")
    assert encode_messages(messages, "thinking") == expected


def test_tool_call_rendering_of_value_types():
    args = {"city": "東京", "days": 3, "ratio": 0.5, "exact": True, "none": None, "tags": ["a", "b"],
            "opts": {"x": 1}, "text": "two\nlines", "number_as_text": "3"}
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "Checking.", "tool_calls": [call("lookup", args), call("now", {})]}]
    expected = (BOS + U + "q" + A + "</think>Checking."
                + dsml(invoke("lookup", ("city", "true", "東京"), ("days", "false", "3"), ("ratio", "false", "0.5"),
                              ("exact", "false", "true"), ("none", "false", "null"), ("tags", "false", '["a", "b"]'),
                              ("opts", "false", '{"x": 1}'), ("text", "true", "two\nlines"),
                              ("number_as_text", "true", "3")),
                       '<｜DSML｜invoke name="now">\n\n</｜DSML｜invoke>') + EOS)
    assert encode_messages(messages, "chat") == expected
    # arguments may also be given as a dict, and calls in the {"name", "arguments"} form
    messages[1]["tool_calls"] = [{"name": "lookup", "arguments": args}, {"name": "now", "arguments": "{}"}]
    assert encode_messages(messages, "chat") == expected


# -- tool results ----------------------------------------------------------------------------------------------

def test_tool_results_merge_into_one_user_turn_in_call_order():
    messages = [
        {"role": "user", "content": "weather in Beijing and Shanghai?"},
        {"role": "assistant", "content": "Let me check both.", "tool_calls": [
            call("get_weather", {"location": "Beijing"}, "c1"), call("get_weather", {"location": "Shanghai"}, "c2")]},
        {"role": "tool", "tool_call_id": "c2", "content": '{"temperature": 26}'},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "22"},
                                                             {"type": "text", "text": "degrees"}]},
        {"role": "user", "content": "Thanks, which is warmer?"},
    ]
    expected = (BOS + U + "weather in Beijing and Shanghai?" + A + "</think>Let me check both."
                + dsml(invoke("get_weather", ("location", "true", "Beijing")),
                       invoke("get_weather", ("location", "true", "Shanghai"))) + EOS
                + U + "<tool_result>22\n\ndegrees</tool_result>\n\n<tool_result>{\"temperature\": 26}</tool_result>"
                + "\n\nThanks, which is warmer?" + A + "</think>")
    assert encode_messages(messages, "chat") == expected


def test_consecutive_user_messages_share_a_turn_and_text_parts_join():
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "user", "content": "c"}]
    assert encode_messages(messages) == BOS + U + "ab\n\nc" + A + "</think>"


# -- drop_thinking ---------------------------------------------------------------------------------------------

HISTORY = [
    {"role": "user", "content": "u1"},
    {"role": "assistant", "reasoning_content": "r1", "content": "a1"},
    {"role": "developer", "content": "d1"},
    {"role": "assistant", "reasoning_content": "r2", "content": "a2"},
    {"role": "user", "content": "u2"},
    {"role": "assistant", "reasoning_content": "r3", "content": "a3"},
]


@pytest.mark.parametrize("mode,drop_thinking,tools,expected", [
    # thinking, dropping: earlier reasoning goes, and so does the developer turn before the last user turn
    ("thinking", True, False, U + "u1" + A + "</think>a1" + EOS + "a2" + EOS
                              + U + "u2" + A + "<think>r3</think>a3" + EOS),
    # thinking, keeping: every assistant turn keeps its reasoning and every user turn opens <think>
    ("thinking", False, False, U + "u1" + A + "<think>r1</think>a1" + EOS + U + "d1" + A + "<think>r2</think>a2"
                               + EOS + U + "u2" + A + "<think>r3</think>a3" + EOS),
    # tools anywhere turn drop_thinking off
    ("thinking", True, True, "@" + U + "u1" + A + "<think>r1</think>a1" + EOS + U + "d1" + A + "<think>r2</think>a2"
                             + EOS + U + "u2" + A + "<think>r3</think>a3" + EOS),
    # chat mode never renders reasoning, dropping or not
    ("chat", True, False, U + "u1" + A + "</think>a1" + EOS + U + "d1" + A + "</think>a2" + EOS
                          + U + "u2" + A + "</think>a3" + EOS),
    ("chat", False, True, "@" + U + "u1" + A + "</think>a1" + EOS + U + "d1" + A + "</think>a2" + EOS
                          + U + "u2" + A + "</think>a3" + EOS),
])
def test_drop_thinking_rules(mode, drop_thinking, tools, expected):
    expected = BOS + expected.replace("@", "\n\n" + tools_section(SEARCH_JSON))
    assert encode_messages(HISTORY, mode, drop_thinking=drop_thinking, tools=[SEARCH] if tools else None) == expected


def test_reasoning_key_aliases():
    """DeepSeek's API calls it reasoning_content; vLLM's copy of the encoder calls it reasoning."""
    m = [{"role": "user", "content": "q"}]
    a = encode_messages(m + [{"role": "assistant", "reasoning_content": "r", "content": "c"}], "thinking")
    b = encode_messages(m + [{"role": "assistant", "reasoning": "r", "content": "c"}], "thinking")
    assert a == b == BOS + U + "q" + A + "<think>r</think>c" + EOS


# -- context, tasks, wo_eos ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,drop_thinking", [("chat", True), ("thinking", False)])
def test_context_continues_the_rendering(mode, drop_thinking):
    context, rest = HISTORY[:4], HISTORY[4:]
    whole = encode_messages(HISTORY, mode, drop_thinking=drop_thinking)
    head = encode_messages(context, mode, drop_thinking=drop_thinking)
    tail = encode_messages(rest, mode, context=context, drop_thinking=drop_thinking)
    assert head + tail == whole and not tail.startswith(BOS)


@pytest.mark.parametrize("mode,think", [("chat", "</think>"), ("thinking", "<think>")])
def test_task_tokens(mode, think):
    q = {"role": "user", "content": "q"}
    assert encode_messages([q | {"task": "action"}], mode) == BOS + U + "q" + A + think + "<｜action｜>"
    assert encode_messages([q | {"task": "title"}], mode) == BOS + U + "q<｜title｜>"
    # the answer to a task never carries reasoning
    assert encode_messages([q | {"task": "query"}, {"role": "assistant", "reasoning_content": "r", "content": "x"}],
                           mode) == BOS + U + "q<｜query｜>x" + EOS


def test_wo_eos_leaves_the_assistant_turn_open():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "partial", "wo_eos": True}]
    assert encode_messages(messages) == BOS + U + "q" + A + "</think>partial"


# -- parse_completion ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,mode,expected", [
    ("Paris." + EOS, "chat", ("", "Paris.", [])),
    ("Paris.", "chat", ("", "Paris.", [])),                                      # the engine strips EOS
    ("hmm</think>Paris." + EOS, "thinking", ("hmm", "Paris.", [])),
    ("still thinking", "thinking", ("still thinking", "", [])),                  # stopped inside the reasoning
    ("r</think>" + EOS, "thinking", ("r", "", [])),
    ("a\n\nb", "chat", ("", "a\n\nb", [])),
    # string="false" values are kept as the model wrote them (1.50 stays 1.50)
    ("r</think>ok" + dsml(invoke("f", ("s", "true", "x\ny"), ("n", "false", "1.50"), ("o", "false", '{"k":[1,null]}')))
     + EOS, "thinking",
     ("r", "ok", [{"type": "function",
                   "function": {"name": "f", "arguments": '{"s": "x\\ny", "n": 1.50, "o": {"k":[1,null]}}'}}])),
    # a call without parameters, in the rendered form (an empty line) and without the empty line
    (dsml('<｜DSML｜invoke name="now">\n\n</｜DSML｜invoke>', '<｜DSML｜invoke name="later">\n</｜DSML｜invoke>'),
     "chat",
     ("", "", [{"type": "function", "function": {"name": "now", "arguments": "{}"}},
               {"type": "function", "function": {"name": "later", "arguments": "{}"}}])),
])
def test_parse_completion(text, mode, expected):
    assert parse_completion(text, mode) == expected


@pytest.mark.parametrize("text", [
    "a" + EOS + "b",                                                             # text after EOS
    dsml(invoke("f", ("a", "true", "1"))) + "trailing",                          # text after the calls
    dsml(invoke("f", ("a", "true", "1")))[:-len("</｜DSML｜tool_calls>")],        # unterminated block
    dsml(invoke("f", ("a", "maybe", "1"))),                                      # bad string attribute
    dsml(invoke("f", ("a", "false", "not json"))),
    dsml(invoke("f", ("a", "true", "1"), ("a", "true", "2"))),                   # duplicate parameter
    "\n\n<｜DSML｜tool_calls>\n<｜DSML｜call name=\"f\">\n</｜DSML｜call>\n</｜DSML｜tool_calls>",
    "answer with a stray </think> tag",
    "answer <｜DSML｜invoke name=\"f\">",
])
def test_parse_completion_rejects_malformed(text):
    with pytest.raises(ValueError):
        parse_completion(text, "chat")


def test_parse_completion_rejects_a_tool_call_inside_the_reasoning():
    with pytest.raises(ValueError):
        parse_completion("r" + dsml(invoke("f", ("a", "true", "1"))) + "</think>x", "thinking")


# -- round trips -----------------------------------------------------------------------------------------------

ARGUMENTS = [{}, {"location": "Beijing"}, {"q": "naïve 東京 🎭", "n": 3, "deep": {"a": [1, 2.5, None, True]}},
             {"code": "print('hi')\n\nx = {'a': 1}\n", "flag": False, "empty": "", "list": []}]
TURNS = {
    "answer": {"reasoning": "", "content": "Paris.", "calls": []},
    "reasoning-and-answer": {"reasoning": "Let me think.\nStep 2.", "content": "It is 4.", "calls": []},
    "one-call": {"reasoning": "Need the tool.", "content": "", "calls": [("get_weather", ARGUMENTS[1])]},
    "text-and-calls": {"reasoning": "two", "content": "Checking both.\n\nOne moment.",
                           "calls": [("get_weather", ARGUMENTS[2]), ("run", ARGUMENTS[3]), ("now", ARGUMENTS[0])]},
}


@pytest.mark.parametrize("turn", list(TURNS))
@pytest.mark.parametrize("mode", ["chat", "thinking"])
@pytest.mark.parametrize("with_tools", [False, True])
def test_round_trip(turn, mode, with_tools):
    t = TURNS[turn]
    assistant = {"role": "assistant", "reasoning_content": t["reasoning"], "content": t["content"],
                 "tool_calls": [call(name, args, f"c{i}") for i, (name, args) in enumerate(t["calls"])]}
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "q"}, assistant]
    prompt = encode_messages(messages, mode, tools=[WEATHER, SEARCH] if with_tools else None)
    opener = A + ("<think>" if mode == "thinking" else "</think>")
    rendered = prompt[prompt.rindex(opener) + len(opener):]
    assert rendered.endswith(EOS)
    reasoning, content, calls = parse_completion(rendered, mode)
    assert reasoning == (t["reasoning"] if mode == "thinking" else "")
    assert content == t["content"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == t["calls"]
    assert all(c["type"] == "function" for c in calls)
    assert parse_completion(rendered.removesuffix(EOS), mode) == (reasoning, content, calls)


@pytest.mark.parametrize("turn", ["answer", "reasoning-and-answer"])
def test_server_reasoning_split_agrees_on_v4_turns(turn):
    """The server's streaming <think> splitter handles V4 completions: the V4 thinking prompt opens <think>."""
    t = TURNS[turn]
    messages = [{"role": "user", "content": "q"}]
    assert prompt_opens_thinking(encode_messages(messages, "thinking"))
    assert not prompt_opens_thinking(encode_messages(messages, "chat"))
    completion = t["reasoning"] + "</think>" + t["content"]
    assert split_reasoning(completion) == parse_completion(completion, "thinking")[:2]


# -- errors ----------------------------------------------------------------------------------------------------

Q = {"role": "user", "content": "q"}


@pytest.mark.parametrize("messages,match", [
    ([], "non-empty"),
    ("hello", "non-empty"),
    (["not a dict"], "role"),
    ([{"content": "no role"}], "role"),
    ([{"role": "robot", "content": "x"}], "allowed: system, user, developer, assistant, tool, latest_reminder"),
    ([{"role": "user"}], "needs 'content'"),
    ([{"role": "user", "content": None}], "needs 'content'"),
    ([Q, {"role": "tool"}], "needs 'content'"),
    ([{"role": "latest_reminder"}, Q], "needs 'content'"),
    ([{"role": "developer", "content": ""}], "non-empty"),
    ([Q, {"role": "assistant"}], "content, tool_calls or reasoning_content"),
    ([{"role": "user", "content": 5}], "string or a list of text parts"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "content parts"),
    ([Q, {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{bad"}}]}],
     "not valid JSON"),
    ([Q, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1, 2]"}}]}], "JSON object"),
    ([Q, {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], "'name'"),
    ([Q, {"role": "assistant", "tool_calls": "f()"}], "must be a list"),
    ([{"role": "user", "content": "q", "task": "dance"}], "allowed: action, query"),
    ([{"role": "user", "content": "q", "tools": [SEARCH]}], "system or developer"),
    ([{"role": "system", "content": "s", "tools": [{"type": "function"}]}, Q], "each tool"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_messages(messages, match):
    with pytest.raises(ValueError, match=match):
        encode_messages(messages)


@pytest.mark.parametrize("kwargs,match", [
    ({"thinking_mode": "deep"}, "thinking_mode must be one of"),
    ({"thinking_mode": True}, "thinking_mode must be one of"),
    ({"reasoning_effort": "low"}, "reasoning_effort must be one of"),
    ({"tools": "search"}, "tools must be a list"),
    ({"tools": [SEARCH], "context": [{"role": "system", "content": "s"}]}, "context"),
    ({"response_format": {"type": "object", "properties": {"x": object()}}}, "JSON-serializable"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        encode_messages([Q], **kwargs)


def test_tools_given_twice():
    with pytest.raises(ValueError, match="twice"):
        encode_messages([{"role": "system", "content": "s", "tools": [SEARCH]}, Q], tools=[WEATHER])


def test_parse_completion_bad_mode():
    with pytest.raises(ValueError, match="thinking_mode"):
        parse_completion("x", "reasoning")


def test_input_messages_are_not_modified():
    messages = json.loads(json.dumps(GOLD_TOOLS))
    encode_messages(messages, "thinking", tools=[WEATHER])
    assert messages == json.loads(json.dumps(GOLD_TOOLS))


# -- the Tokenizer picks this encoder for V4 checkpoints -------------------------------------------------------

def v4_folder(path, template=None, model_type="deepseek_v4"):
    path.mkdir(parents=True, exist_ok=True)
    fixtures.write_tokenizer(path, template)
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return path


def test_tokenizer_uses_v4_encoder_for_v4_checkpoints(tmp_path):
    tok = Tokenizer.from_dir(v4_folder(tmp_path))
    assert tok.chat_format == "deepseek_v4"
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == BOS + "s" + U + "hi" + A + "</think>"
    assert tok.apply_chat_template(messages, thinking=True) == BOS + "s" + U + "hi" + A + "<think>"
    assert tok.apply_chat_template(messages, enable_thinking=True, reasoning_effort="max") == \
        BOS + EFFORT_MAX + "s" + U + "hi" + A + "<think>"
    assert tok.apply_chat_template(messages, thinking_mode="thinking", add_generation_prompt=False) == \
        BOS + "s" + U + "hi"
    assert tok.apply_chat_template(messages, tools=[SEARCH]) == \
        BOS + "s\n\n" + tools_section(SEARCH_JSON) + U + "hi" + A + "</think>"
    ids = tok.encode_chat(messages, thinking=True)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert ids[-1] == tok.think_start_id == tok._tok.token_to_id("<think>")
    assert tok.encode_chat(messages)[-1] == tok.think_end_id == tok._tok.token_to_id("</think>")


def test_tokenizer_chat_format_rule(tmp_path):
    # model_type decides, also when passed in, and over a template the folder may hold
    assert Tokenizer.from_dir(v4_folder(tmp_path / "a", template=fixtures.V3_TEMPLATE)).chat_format == "deepseek_v4"
    assert Tokenizer.from_dir(v4_folder(tmp_path / "b", model_type="deepseek_v3"),
                              {"model_type": "deepseek_v4"}).chat_format == "deepseek_v4"
    v3 = Tokenizer.from_dir(v4_folder(tmp_path / "c", template=fixtures.V3_TEMPLATE, model_type="deepseek_v3"))
    assert v3.chat_format == "jinja"
    assert v3.apply_chat_template([Q], thinking=True) == BOS + U + "q" + A + "<think>"     # the template's rendering
    no_config = tmp_path / "d"
    no_config.mkdir()
    fixtures.write_tokenizer(no_config, None)
    assert Tokenizer.from_dir(no_config).chat_format == "jinja"


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": 0.5}, "allowed: thinking, enable_thinking"),
    ({"thinking": "yes"}, "true or false"),
    ({"reasoning_effort": "medium"}, "reasoning_effort"),
])
def test_tokenizer_v4_bad_options(tmp_path, kwargs, match):
    tok = Tokenizer.from_dir(v4_folder(tmp_path))
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template([Q], **kwargs)


def test_tokenizer_v4_needs_its_special_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr(fixtures, "SPECIALS", [BOS, EOS, "<｜▁pad▁｜>", U, A])
    tok = Tokenizer.from_dir(v4_folder(tmp_path))
    assert tok.think_start_id is None and tok.think_end_id is None
    with pytest.raises(ValueError, match="<think>, </think>"):
        tok.apply_chat_template([Q])
