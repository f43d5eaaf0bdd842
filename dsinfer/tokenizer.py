"""Tokenizer (HF `tokenizer.json` through the `tokenizers` library) and the chat format: the checkpoint's jinja chat
template, or for DeepSeek-V4 (model_type "deepseek_v4" in config.json; V4 ships no template) the encoder in
chat_v4.py."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from . import chat_v4

# Chat formats: "jinja" renders the checkpoint's template; "deepseek_v4" renders with chat_v4.encode_messages.
CHAT_FORMATS = ("jinja", "deepseek_v4")
V4_TEMPLATE_KWARGS = ("thinking", "enable_thinking", "thinking_mode", "tools", "reasoning_effort", "drop_thinking",
                      "response_format", "context")


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, config: dict, eos_ids: set[int], chat_template: str | None,
                 chat_format: str = "jinja"):
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"unknown chat_format {chat_format!r}; allowed: {', '.join(CHAT_FORMATS)}")
        self._tok = tokenizer
        self.config = config
        self.chat_template = chat_template
        self.chat_format = chat_format
        self.think_start_id = self._tok.token_to_id(chat_v4.THINK_START)     # None where the vocabulary has none
        self.think_end_id = self._tok.token_to_id(chat_v4.THINK_END)
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.add_bos = bool(config.get("add_bos_token", True)) and self.bos_id is not None
        eos_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.eos_ids = set(eos_ids) | ({eos_id} if eos_id is not None else set())
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, path: str | Path, model_config: dict | None = None) -> "Tokenizer":
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ValueError(f"{path} has no tokenizer.json (dsinfer reads the fast-tokenizer file of a HF checkpoint)")
        try:
            tokenizer = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the tokenizers library raises its own Exception type
            raise ValueError(f"cannot read {tok_file}: {e}") from None
        config = _read_json(path / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):       # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        jinja_file = path / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        eos_ids: set[int] = set()
        for source in (_read_json(path / "generation_config.json"), model_config or {}):
            eos = source.get("eos_token_id")
            if eos is not None:
                eos_ids |= set(eos) if isinstance(eos, list) else {eos}
                break
        # The rule for the chat format: model_type "deepseek_v4" (from model_config, else the folder's config.json)
        # selects the V4 encoder, whatever template the folder may hold; anything else uses the template.
        model_type = (model_config if model_config is not None else _read_json(path / "config.json")).get("model_type")
        return cls(tokenizer, config, eos_ids, template, "deepseek_v4" if model_type == "deepseek_v4" else "jinja")

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; BOS is prepended when the tokenizer asks for it (once)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render a conversation with the checkpoint's template (as HF transformers renders it), or with the V4
        encoder, which takes thinking/enable_thinking (bool) or thinking_mode, tools, reasoning_effort,
        drop_thinking, response_format and context."""
        if self.chat_format == "deepseek_v4":
            return self._apply_v4(messages, add_generation_prompt, kwargs)
        if not self.chat_template:
            raise ValueError("this checkpoint has no chat template; use generate with a plain prompt instead")
        _check_messages(messages)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        context = dict(messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                       bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        context.update(kwargs)
        try:
            return env.from_string(self.chat_template).render(**context)
        except (TemplateError, TypeError) as e:
            raise ValueError(f"chat template error: {e}") from None

    def _apply_v4(self, messages: list[dict], add_generation_prompt: bool, kwargs: dict) -> str:
        if unknown := [k for k in kwargs if k not in V4_TEMPLATE_KWARGS]:
            raise ValueError(f"unknown DeepSeek-V4 chat option(s) {', '.join(unknown)}; "
                             f"allowed: {', '.join(V4_TEMPLATE_KWARGS)}")
        needed = (chat_v4.BOS, chat_v4.EOS, chat_v4.USER, chat_v4.ASSISTANT, chat_v4.THINK_START, chat_v4.THINK_END)
        if missing := [t for t in needed if self._tok.token_to_id(t) is None]:
            raise ValueError(f"this tokenizer lacks the DeepSeek-V4 chat tokens {', '.join(missing)}")
        thinking = [kwargs[k] for k in ("thinking", "enable_thinking") if kwargs.get(k) is not None]
        if any(not isinstance(t, bool) for t in thinking):
            raise ValueError(f"thinking/enable_thinking must be true or false; got {thinking}")
        mode = kwargs.get("thinking_mode") or ("thinking" if any(thinking) else "chat")
        return chat_v4.encode_messages(
            messages, thinking_mode=mode, context=kwargs.get("context"),
            drop_thinking=kwargs.get("drop_thinking", True), reasoning_effort=kwargs.get("reasoning_effort"),
            tools=kwargs.get("tools") or None, response_format=kwargs.get("response_format"),
            add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Render and tokenize; the templates write BOS themselves, so it is present exactly once."""
        ids = self._tok.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs),
                               add_special_tokens=False).ids
        while len(ids) > 1 and ids[0] == ids[1] == self.bos_id:
            ids = ids[1:]
        if self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 sequences; special tokens
    are left out unless skip_special_tokens is False (the server's tool-call parser needs DeepSeek's markers)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """Text still held back (an incomplete UTF-8 sequence at the very end), with replacement characters."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str):
    raise TemplateError(message)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"each message needs a 'role'; got {m!r}")
        if m["role"] not in ("system", "user", "assistant", "tool", "developer"):
            raise ValueError(f"unknown message role {m['role']!r}; allowed: system, user, assistant, tool, developer")
