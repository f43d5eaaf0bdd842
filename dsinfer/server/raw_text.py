"""A completion's text with special tokens kept, for the tool-call parser.

The engine's text leaves special tokens out, and DeepSeek's tool-call markers (`<｜tool▁calls▁begin｜>`, ...) are
special tokens in the real tokenizers. When tools are in play the server detokenizes the generated ids itself,
keeping them: EOS is left out, stop strings are cut and text that may begin one is held back, as the engine does
with its own text (a stop string is matched against this text, special tokens included).
"""

from __future__ import annotations

from ..engine.engine import StepOutput
from ..tokenizer import IncrementalDetokenizer, Tokenizer


class RawText:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
        self.eos_ids = tokenizer.eos_ids
        self.stop = stop
        self.text = ""
        self.num_emitted_chars = 0
        self.stopped = False        # a stop string was found; later tokens are ignored

    def feed(self, out: StepOutput) -> str:
        """One engine output -> the text delta that became final."""
        if not self.stopped:
            for token in out.new_token_ids:
                if token not in self.eos_ids:
                    self.text += self.detokenizer.step(token)
            if out.finished:
                self.text += self.detokenizer.flush()
            self._cut_at_stop()
        hold = 0 if out.finished or self.stopped else max((len(s) for s in self.stop), default=1) - 1
        end = max(self.num_emitted_chars, len(self.text) - hold)
        new_text, self.num_emitted_chars = self.text[self.num_emitted_chars:end], end
        return new_text

    def _cut_at_stop(self) -> None:
        if not self.stop:
            return
        start = max(0, self.num_emitted_chars - max(len(s) for s in self.stop))
        found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if found:
            self.text, self.stopped = self.text[:min(found)], True
