"""DeepSeek-V4 chat format: messages -> prompt text, and a completion -> (reasoning, content, tool calls).

V4 ships no jinja chat template. DeepSeek publishes a Python encoder instead (`encoding/encoding_dsv4.py` in the
V4 release); this module renders the same text with its own code. A conversation reads

    BOS [effort paragraph] system [\\n\\n## Tools ...] [\\n\\n## Response Format ...]
    <｜User｜>question<｜Assistant｜><think>reasoning</think>answer
    \\n\\n<｜DSML｜tool_calls>...</｜DSML｜tool_calls>EOS
    <｜User｜><tool_result>...</tool_result><｜Assistant｜><think>

Design notes (the rules of the reference encoder, reproduced on purpose, quirks included):
- Tool messages are merged into user turns: a tool result becomes a `<tool_result>` block of a user turn, and a
  user message that follows tool results (or another user message) joins that turn; blocks are joined by a blank
  line. Tool results are reordered to follow the order of the calls of the last assistant message with calls.
- `<｜Assistant｜>` plus `<think>` (thinking mode) or `</think>` (chat mode) follows a user/developer turn when the
  next message is an assistant or latest_reminder message, or when it is the last message.
- Thinking mode, drop_thinking on: reasoning is kept only for assistant turns after the last user/developer turn
  (earlier ones open with nothing and start with their content, and their user turn ends with `</think>`), and
  developer messages before the last user turn are left out. drop_thinking turns itself off when any message
  carries tools. Chat mode never renders reasoning.
- The "max" effort paragraph goes at the very start, in thinking mode only; "high" adds nothing.

Provenance of the fixed texts (the tools section, the effort paragraph, the response-format header): checked
word for word against two copies of the published V4 `encoding_dsv4.py` (vLLM's vendored
`vllm/tokenizers/deepseek_v4_encoding.py` and a third-party annotated copy) and a transcription of the release's
gold file `encoding/tests/test_output_1.txt`. Not implemented: the later V4-Flash-0731 encoder, which changed the
effort ladder (low/high/max, with a different "max" paragraph), and image content blocks.
"""

from __future__ import annotations

import json
import re

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START, THINK_END = "<think>", "</think>"
DSML = "｜DSML｜"
TASK_TOKENS = {"action": "<｜action｜>", "query": "<｜query｜>", "authority": "<｜authority｜>",
               "domain": "<｜domain｜>", "title": "<｜title｜>", "read_url": "<｜read_url｜>"}
ROLES = ("system", "user", "developer", "assistant", "tool", "latest_reminder")
THINKING_MODES = ("chat", "thinking")
REASONING_EFFORTS = (None, "high", "max")

REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n")

TOOLS_SECTION = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \
"<{DSML}tool_calls>" block like the following:

<{DSML}tool_calls>
<{DSML}invoke name="$TOOL_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>
...
</{DSML}invoke>
<{DSML}invoke name="$TOOL_NAME2">
...
</{DSML}invoke>
</{DSML}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, \
arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside \
{THINK_START}...{THINK_END} BEFORE any tool calls or final response.

Otherwise, output directly after {THINK_END} with tool calls or final response.

### Available Tool Schemas

@SCHEMAS@

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

RESPONSE_FORMAT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"

TOOL_CALLS_START = f"\n\n<{DSML}tool_calls"     # where the content of an assistant turn ends and its calls begin
TOOL_CALLS_END = f"</{DSML}tool_calls>"
INVOKE_END = f"</{DSML}invoke>"
_INVOKE = re.compile(rf'<{DSML}invoke\s*name="(.*?)">\n', re.DOTALL)
_PARAM = re.compile(rf'<{DSML}parameter name="(.*?)" string="(true|false)">(.*?)</{DSML}parameter>\n', re.DOTALL)


# -- encoding --------------------------------------------------------------------------------------------------

def encode_messages(messages: list[dict], thinking_mode: str = "chat", context: list[dict] | None = None,
                    drop_thinking: bool = True, add_default_bos_token: bool = True,
                    reasoning_effort: str | None = None, tools: list[dict] | None = None,
                    response_format=None, add_generation_prompt: bool = True) -> str:
    """Render `messages` (after the already-rendered `context`, if any) as V4 prompt text.

    `tools` and `response_format` go on the leading system message (one with empty content is inserted when the
    conversation does not start with one). add_generation_prompt=False leaves out what would follow the last
    message (`<｜Assistant｜><think>` or a task token)."""
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {THINKING_MODES}; got {thinking_mode!r}")
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {REASONING_EFFORTS}; got {reasoning_effort!r}")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    if context is not None and not isinstance(context, list):
        raise ValueError(f"context must be a list of messages or None; got {type(context).__name__}")
    context = [_normalize(m, f"context[{i}]") for i, m in enumerate(context or [])]
    messages = [_normalize(m, f"messages[{i}]") for i, m in enumerate(messages)]
    if tools is not None or response_format is not None:
        if context:
            raise ValueError("with a context, give tools/response_format on the context's system message")
        messages = _attach_to_system(messages, tools, response_format)

    context, messages = _merge_tool_results(context), _merge_tool_results(messages)
    full = _sort_tool_results(context + messages)
    drop = drop_thinking and not any(m.get("tools") for m in full)
    start = len(context)
    if thinking_mode == "thinking" and drop:
        full, start = _drop_thinking(full), len(_drop_thinking(context))
    last_user = _last_user_index(full)
    prompt = BOS if add_default_bos_token and not context else ""
    for i in range(start, len(full)):
        prompt += _render(i, full, thinking_mode, drop, reasoning_effort, last_user, add_generation_prompt)
    return prompt


def _render(i: int, msgs: list[dict], mode: str, drop: bool, effort: str | None, last_user: int,
            add_generation_prompt: bool) -> str:
    m, role = msgs[i], msgs[i]["role"]
    out = REASONING_EFFORT_MAX if i == 0 and mode == "thinking" and effort == "max" else ""
    if role == "system":
        out += m["content"] + _system_suffix(m)
    elif role == "developer":
        out += USER + m["content"] + _system_suffix(m)
    elif role == "user":
        out += USER + "\n\n".join(text if kind == "text" else f"<tool_result>{text}</tool_result>"
                                  for kind, text, _ in m["blocks"])
    elif role == "latest_reminder":
        out += LATEST_REMINDER + m["content"]
    else:                                                           # assistant
        answers_task = i > 0 and msgs[i - 1].get("task") is not None
        if mode == "thinking" and not answers_task and (not drop or i > last_user):
            out += (m["reasoning"] or "") + THINK_END
        out += m["content"] + _render_tool_calls(m["tool_calls"]) + ("" if m["wo_eos"] else EOS)

    following = msgs[i + 1]["role"] if i + 1 < len(msgs) else None
    if following not in (None, "assistant", "latest_reminder") or (following is None and not add_generation_prompt):
        return out
    task = m.get("task")
    if task == "action":
        out += ASSISTANT + (THINK_START if mode == "thinking" else THINK_END) + TASK_TOKENS[task]
    elif task is not None:
        out += TASK_TOKENS[task]
    elif role in ("user", "developer"):
        out += ASSISTANT + (THINK_START if mode == "thinking" and (not drop or i >= last_user) else THINK_END)
    return out


def _system_suffix(m: dict) -> str:
    out = ""
    if m.get("tools"):
        out += "\n\n" + TOOLS_SECTION.replace("@SCHEMAS@", "\n".join(_to_json(t) for t in m["tools"]))
    if m.get("response_format"):
        out += "\n\n" + RESPONSE_FORMAT + _to_json(m["response_format"])
    return out


def _render_tool_calls(calls: list[tuple[str | None, str, dict]]) -> str:
    if not calls:
        return ""
    invokes = []
    for _, name, args in calls:
        params = "\n".join(
            f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
            f'{v if isinstance(v, str) else _to_json(v)}</{DSML}parameter>' for k, v in args.items())
        invokes.append(f'<{DSML}invoke name="{name}">\n{params}\n{INVOKE_END}')
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n{TOOL_CALLS_END}"


# -- message preparation ---------------------------------------------------------------------------------------

def _normalize(m, where: str) -> dict:
    """Check one message (ours or OpenAI-style) and bring it to one internal form."""
    if not isinstance(m, dict) or "role" not in m:
        raise ValueError(f"{where}: each message must be a dict with a 'role'; got {m!r}")
    role = m["role"]
    if role not in ROLES:
        raise ValueError(f"{where}: unknown role {role!r}; allowed: {', '.join(ROLES)}")
    task = m.get("task")
    if task is not None and task not in TASK_TOKENS:
        raise ValueError(f"{where}: unknown task {task!r}; allowed: {', '.join(TASK_TOKENS)}")
    out = {"role": role, "task": task, "wo_eos": bool(m.get("wo_eos", False))}
    if role == "assistant":
        calls = m.get("tool_calls") or []
        if not isinstance(calls, list):
            raise ValueError(f"{where}: tool_calls must be a list; got {type(calls).__name__}")
        out["tool_calls"] = [_tool_call(tc, f"{where}.tool_calls[{j}]") for j, tc in enumerate(calls)]
        reasoning = m.get("reasoning_content") if m.get("reasoning_content") is not None else m.get("reasoning")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ValueError(f"{where}: reasoning_content must be a string; got {type(reasoning).__name__}")
        if m.get("content") is None and not out["tool_calls"] and reasoning is None:
            raise ValueError(f"{where}: an assistant message needs content, tool_calls or reasoning_content")
        out["reasoning"] = reasoning
        out["content"] = _text(m.get("content") or "", where, "")
    elif role == "system":                         # content may be left out: a system message can be tools only
        out["content"] = _text(m.get("content") or "", where, "")
    else:
        if m.get("content") is None:
            raise ValueError(f"{where}: a {role} message needs 'content' (a string or a list of text parts)")
        out["content"] = _text(m["content"], where, "\n\n" if role == "tool" else "")
        if role == "developer" and not out["content"]:
            raise ValueError(f"{where}: a developer message needs non-empty content")
        if role == "tool":
            out["tool_call_id"] = m.get("tool_call_id")
    if role in ("system", "developer"):
        if m.get("tools") is not None:
            out["tools"] = _tools(m["tools"], where)
        out["response_format"] = m.get("response_format")
    elif m.get("tools") is not None:
        raise ValueError(f"{where}: tools belong on a system or developer message, not on a {role} message")
    return out


def _text(content, where: str, sep: str) -> str:
    """A string, or a list of OpenAI text parts joined by `sep` (the reference joins a tool result's parts with a
    blank line; user parts are joined as OpenAI joins them)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ValueError(f"{where}: content parts must be {{'type': 'text', 'text': str}} (no images); "
                             f"got {content!r}")
        return sep.join(p["text"] for p in content)
    raise ValueError(f"{where}: content must be a string or a list of text parts; got {type(content).__name__}")


def _tool_call(tc, where: str) -> tuple[str | None, str, dict]:
    """(id, name, arguments) of {"type": "function", "function": {"name", "arguments"}} or {"name", "arguments"}."""
    fn = tc.get("function") if isinstance(tc, dict) and "function" in tc else tc
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"{where}: a tool call is {{'type': 'function', 'function': {{'name': str, 'arguments': "
                         f"JSON object string}}}}; got {tc!r}")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: arguments are not valid JSON ({e}): {fn['arguments']!r}") from None
    if not isinstance(args, dict):
        raise ValueError(  # noqa: TRY004
            f"{where}: arguments must be a JSON object (a dict or its JSON text); got {args!r}")
    return tc.get("id"), fn["name"], args


def _tools(tools, where: str) -> list[dict]:
    if not isinstance(tools, list):
        raise ValueError(  # noqa: TRY004
            f"{where}: tools must be a list of {{'type': 'function', 'function': {{...}}}}")
    out = []
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) and "function" in t else t
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(  # noqa: TRY004 (malformed input is a ValueError throughout this module)
                f"{where}: each tool is {{'type': 'function', 'function': {{'name': str, ...}}}}; got {t!r}")
        out.append(fn)
    return out


def _attach_to_system(messages: list[dict], tools, response_format) -> list[dict]:
    if messages[0]["role"] != "system":
        messages = [_normalize({"role": "system"}, "system")] + messages
    system = messages[0]
    if tools is not None:
        if system.get("tools"):
            raise ValueError("tools given twice: as an argument and on the system message")
        system["tools"] = _tools(tools, "tools")
    if response_format is not None:
        if system.get("response_format"):
            raise ValueError("response_format given twice: as an argument and on the system message")
        system["response_format"] = response_format
    return messages


def _merge_tool_results(messages: list[dict]) -> list[dict]:
    """Tool and user messages -> user turns made of blocks (kind, text, tool_call_id)."""
    merged: list[dict] = []
    for m in messages:
        if m["role"] == "tool":
            block = ("tool_result", m["content"], m["tool_call_id"])
            if merged and merged[-1]["role"] == "user":
                merged[-1]["blocks"].append(block)
            else:
                merged.append({"role": "user", "blocks": [block], "task": None, "wo_eos": False})
        elif m["role"] == "user":
            block = ("text", m["content"], None)
            if merged and merged[-1]["role"] == "user" and merged[-1]["task"] is None:
                merged[-1]["blocks"].append(block)
            else:
                merged.append({"role": "user", "blocks": [block], "task": m["task"], "wo_eos": m["wo_eos"]})
        else:
            merged.append(m)
    return merged


def _sort_tool_results(messages: list[dict]) -> list[dict]:
    """Put the tool results of each user turn in the order of the latest assistant message's calls."""
    order: dict[str, int] = {}
    for m in messages:
        if m["role"] == "assistant" and m["tool_calls"]:
            order = {cid: j for j, (cid, _, _) in enumerate(m["tool_calls"]) if cid}
        elif m["role"] == "user" and order:
            results = [b for b in m["blocks"] if b[0] == "tool_result"]
            if len(results) > 1:
                ranked = iter(sorted(results, key=lambda b: order.get(b[2] or "", 0)))
                m["blocks"] = [next(ranked) if b[0] == "tool_result" else b for b in m["blocks"]]
    return messages


def _drop_thinking(messages: list[dict]) -> list[dict]:
    """Before the last user turn: assistant reasoning is removed and developer messages are left out."""
    last_user = _last_user_index(messages)
    out = []
    for i, m in enumerate(messages):
        if i >= last_user or m["role"] in ("user", "system", "latest_reminder"):
            out.append(m)
        elif m["role"] == "assistant":
            out.append(m | {"reasoning": None})
    return out


def _last_user_index(messages: list[dict]) -> int:
    return max((i for i, m in enumerate(messages) if m["role"] in ("user", "developer")), default=-1)


def _to_json(value) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"not JSON-serializable: {value!r} ({e})") from None


# -- parsing ---------------------------------------------------------------------------------------------------

def parse_completion(text: str, thinking_mode: str) -> tuple[str, str, list[dict]]:
    """One assistant turn as generated (after `<think>` or `</think>`) -> (reasoning, content, tool calls).

    Tool calls come back OpenAI-style, {"type": "function", "function": {"name", "arguments": JSON text}}. The
    text may end with EOS or not (the engine strips it); a thinking-mode text with no `</think>` is all reasoning
    (generation stopped while reasoning). Malformed DSML, text after EOS or after the calls, and special tokens
    inside the reasoning or content raise ValueError."""
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {THINKING_MODES}; got {thinking_mode!r}")
    reasoning, pos = "", 0
    if thinking_mode == "thinking":
        end = text.find(THINK_END)
        if end < 0:
            reasoning = text.removesuffix(EOS)
            _check_plain(reasoning, "reasoning")
            return reasoning, "", []
        reasoning, pos = text[:end], end + len(THINK_END)
    eos, start = text.find(EOS, pos), text.find(TOOL_CALLS_START, pos)
    calls: list[dict] = []
    if start >= 0 and (eos < 0 or start < eos):
        content = text[pos:start]
        calls, pos = _parse_tool_calls(text, start + len(TOOL_CALLS_START))
        if text[pos:] not in ("", EOS):
            raise ValueError(f"unexpected text after the tool calls: {text[pos:pos + 60]!r}")
    else:
        content = text[pos:eos] if eos >= 0 else text[pos:]
        if eos >= 0 and eos + len(EOS) != len(text):
            raise ValueError(f"unexpected text after EOS: {text[eos + len(EOS):][:60]!r}")
    _check_plain(reasoning, "reasoning")
    _check_plain(content, "content")
    return reasoning, content, calls


def _parse_tool_calls(text: str, pos: int) -> tuple[list[dict], int]:
    """The DSML block after `\\n\\n<｜DSML｜tool_calls` -> (tool calls, position after the closing tag)."""
    def fail(what: str):
        raise ValueError(f"malformed DSML tool calls: {what} at {text[pos:pos + 60]!r}")

    if not text.startswith(">\n", pos):
        fail("expected '>\\n'")
    pos += 2
    calls = []
    while not text.startswith(TOOL_CALLS_END, pos):
        invoke = _INVOKE.match(text, pos)
        if invoke is None:
            fail(f"expected <{DSML}invoke name=...> or {TOOL_CALLS_END}")
        pos = invoke.end()
        args: dict[str, str] = {}
        while (param := _PARAM.match(text, pos)) is not None:
            key, is_string, raw = param.groups()
            if key in args:
                fail(f"parameter {key!r} given twice")
            if is_string == "false":
                try:
                    json.loads(raw)
                except json.JSONDecodeError:
                    fail(f'parameter {key!r} has string="false" but its value is not JSON')
            args[key] = raw if is_string == "false" else _to_json(raw)
            pos = param.end()
        if not args and text.startswith("\n", pos):       # a call without parameters renders an empty line
            pos += 1
        if not text.startswith(INVOKE_END + "\n", pos):
            fail(f"expected <{DSML}parameter ...> or {INVOKE_END}")
        pos += len(INVOKE_END) + 1
        arguments = "{" + ", ".join(f"{_to_json(k)}: {v}" for k, v in args.items()) + "}"
        calls.append({"type": "function", "function": {"name": invoke.group(1), "arguments": arguments}})
    return calls, pos + len(TOOL_CALLS_END)


def _check_plain(text: str, what: str) -> None:
    for token in (BOS, EOS, THINK_START, THINK_END, DSML):
        if token in text:
            raise ValueError(f"unexpected {token!r} in the {what} of the completion")
