"""Tool calls in a completion: DeepSeek's V3-family tokens or V4's DSML block -> OpenAI `tool_calls`.

The V3 family writes its calls after the content as special tokens, `<｜tool▁calls▁begin｜>`, then one call per
line, then `<｜tool▁calls▁end｜>`. A call is

    V3, R1-0528:  <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>
    V3.1:         <｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>

The variant is told apart per call by its text (a `function` type before the
separator and a fenced JSON block after it is V3's). V4 writes `\\n\\n<｜DSML｜tool_calls>...` after the content,
which chat_v4.parse_completion reads. Either way the calls come last: once the start marker appears, the rest of
the completion is the call block. The streaming parser holds back text that may be the beginning of the marker
(as reasoning.py does for `</think>`) and parses the block when the completion ends; a block that does not parse
is returned as plain content.
"""

from __future__ import annotations

import json
import re
import uuid

from .. import chat_v4
from .reasoning import partial_suffix

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
TOOL_FORMATS = ("deepseek_v3", "deepseek_v4")       # V3/V3.1/R1 tokens; V4 DSML
_FENCED = re.compile(r"(?P<name>[^\n]+)\n```(?:json)?\n(?P<args>.*)\n```\s*", re.DOTALL)


def start_marker(fmt: str) -> str:
    """The text that opens the tool calls in format `fmt`."""
    if fmt not in TOOL_FORMATS:
        raise ValueError(f"unknown tool-call format {fmt!r}; allowed: {', '.join(TOOL_FORMATS)}")
    return CALLS_BEGIN if fmt == "deepseek_v3" else chat_v4.TOOL_CALLS_START


def parse_tool_calls(text: str, fmt: str) -> tuple[str, list[dict]]:
    """A completion's content (after any reasoning) -> (the content before the calls, OpenAI tool calls without
    ids). No marker: (text, []). A malformed call block raises ValueError."""
    start = text.find(start_marker(fmt))
    if start < 0:
        return text, []
    if fmt == "deepseek_v4":
        _, content, calls = chat_v4.parse_completion(text, "chat")
        return content, [_call(c["function"]["name"], c["function"]["arguments"]) for c in calls]
    return text[:start], _parse_v3_block(text[start + len(CALLS_BEGIN):])


def _parse_v3_block(body: str) -> list[dict]:
    end = body.find(CALLS_END)
    if end < 0:
        raise ValueError(f"the tool calls do not end with {CALLS_END}")
    if body[end + len(CALLS_END):].strip():
        raise ValueError(f"unexpected text after {CALLS_END}: {body[end + len(CALLS_END):][:60]!r}")
    body, calls, pos = body[:end], [], 0
    while body[pos:].strip():
        pos += len(body[pos:]) - len(body[pos:].lstrip())
        if not body.startswith(CALL_BEGIN, pos):
            raise ValueError(f"expected {CALL_BEGIN} at {body[pos:pos + 60]!r}")
        stop = body.find(CALL_END, pos)
        if stop < 0:
            raise ValueError(f"a tool call does not end with {CALL_END}")
        calls.append(_parse_v3_call(body[pos + len(CALL_BEGIN):stop]))
        pos = stop + len(CALL_END)
    if not calls:
        raise ValueError("an empty tool-call block")
    return calls


def _parse_v3_call(item: str) -> dict:
    head, sep, rest = item.partition(SEP)
    if not sep:
        raise ValueError(f"a tool call without {SEP}: {item[:60]!r}")
    fenced = _FENCED.fullmatch(rest) if head == "function" else None
    if fenced is not None:                                          # V3 / R1-0528
        return _call(fenced.group("name").strip(), fenced.group("args"))
    return _call(head.strip(), rest)                                # V3.1


def _call(name: str, arguments: str) -> dict:
    """An OpenAI tool call; the arguments must be a JSON object and come back as compact JSON text."""
    if not name:
        raise ValueError("a tool call without a function name")
    try:
        args = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"the arguments of {name!r} are not JSON ({e})") from None
    if not isinstance(args, dict):
        raise ValueError(f"the arguments of {name!r} are not a JSON object: {arguments[:60]!r}")  # noqa: TRY004
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


class ToolCallParser:
    """Fed a completion's content in pieces; passes the text before the calls through and keeps the rest."""

    def __init__(self, fmt: str):
        self.fmt, self.marker = fmt, start_marker(fmt)
        self._held = ""                 # text that may be the beginning of the marker
        self._block: str | None = None  # from the marker on, once it has appeared

    def feed(self, text: str) -> str:
        """Next piece -> the content delta that is certainly not part of a tool call."""
        if self._block is not None:
            self._block += text
            return ""
        text, self._held = self._held + text, ""
        start = text.find(self.marker)
        if start >= 0:
            self._block = text[start:]
            return text[:start]
        keep = partial_suffix(text, self.marker)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> tuple[str, list[dict]]:
        """The end of the completion -> (content still held back, tool calls). A block that does not parse comes
        back whole as content."""
        held, block, self._held, self._block = self._held, self._block, "", None
        if block is None:
            return held, []
        try:
            content, calls = parse_tool_calls(block, self.fmt)
        except ValueError:
            return block, []
        return content, calls


def split_tool_calls(text: str, fmt: str) -> tuple[str, list[dict]]:
    """A whole completion's content -> (content, tool calls), as the streaming parser splits it."""
    parser = ToolCallParser(fmt)
    content = parser.feed(text)
    rest, calls = parser.flush()
    return content + rest, calls
