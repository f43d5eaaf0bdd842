"""Split a thinking model's completion into reasoning and answer at `</think>`.

R1 and V3.1 (thinking=True) prompts end with `<think>` (R1: `<think>\n`), so the completion is
`reasoning</think>answer`. The parser is fed the text in pieces as it streams and returns (reasoning, content)
deltas; a piece that might be the start of `</think>` is held back until the next piece settles it.
"""

from __future__ import annotations

THINK_START, THINK_END = "<think>", "</think>"
ASSISTANT = "<｜Assistant｜>"


def prompt_opens_thinking(prompt_text: str) -> bool:
    """True when the rendered prompt ends inside a `<think>` block of the last assistant turn."""
    tail = prompt_text.rsplit(ASSISTANT, 1)[-1]
    return tail.rstrip().endswith(THINK_START)


class ReasoningParser:
    def __init__(self, in_reasoning: bool = True):
        self.in_reasoning = in_reasoning
        self._held = ""                 # text that may be the beginning of THINK_END
        self._start = in_reasoning      # still at the very start of the reasoning (a repeated <think> is dropped)

    def feed(self, text: str) -> tuple[str, str]:
        """Next piece of the completion -> (reasoning delta, content delta)."""
        if not self.in_reasoning:
            return "", text
        text = self._held + text
        self._held = ""
        if self._start:
            stripped = text.lstrip()
            if THINK_START.startswith(stripped) and len(stripped) < len(THINK_START):
                self._held = text               # may still become a leading <think>
                return "", ""
            if stripped.startswith(THINK_START):
                text = stripped[len(THINK_START):]
            self._start = False
        end = text.find(THINK_END)
        if end >= 0:
            self.in_reasoning = False
            return text[:end], text[end + len(THINK_END):]
        keep = partial_suffix(text, THINK_END)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep], ""

    def flush(self) -> tuple[str, str]:
        """The end of the completion: text held back is reasoning (the tag never closed)."""
        held, self._held = self._held, ""
        return (held, "") if self.in_reasoning else ("", held)


def split_reasoning(text: str, in_reasoning: bool = True) -> tuple[str, str]:
    """A whole completion -> (reasoning, content)."""
    parser = ReasoningParser(in_reasoning)
    r1, c1 = parser.feed(text)
    r2, c2 = parser.flush()
    return r1 + r2, c1 + c2


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
