"""Request schemas of the OpenAI API subset dsinfer serves.

Known fields are type-checked strictly (a string where a number belongs is a 400, not a silent conversion);
unknown fields are accepted and ignored, since OpenAI clients send fields dsinfer has no use for.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 128                     # choices per request
MAX_CHAT_TOP_LOGPROBS = 20      # OpenAI's limits
MAX_COMPLETION_LOGPROBS = 5


class _Schema(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


class StreamOptions(_Schema):
    include_usage: bool = False


class SamplingFields(_Schema):
    model: str | None = None                           # None: the served model
    max_tokens: int | None = Field(None, ge=1)          # None: up to the end of the context
    temperature: float | None = None                   # None: 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False


class TextPart(_Schema):
    type: str
    text: str | None = None


class FunctionDefinition(_Schema):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None       # a JSON schema
    strict: bool | None = None


class Tool(_Schema):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Schema):
    name: str = Field(min_length=1)


class NamedToolChoice(_Schema):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(_Schema):
    name: str = Field(min_length=1)
    arguments: str                                  # a JSON object, as text


class ToolCall(_Schema):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Schema):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None        # assistant messages
    tool_call_id: str | None = None                 # tool messages

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None    # None: "auto" with tools

    def template_tools(self) -> list[dict]:
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    def template_messages(self) -> list[dict]:
        """Messages as the chat template expects them: content as one string."""
        out = []
        for m in self.messages:
            d = {k: v for k, v in m.model_dump(exclude_none=True).items() if k != "content"}
            out.append(d | {"content": m.text()})
        return out


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(t, int) for t in p):
            return [p]
        return list(p)
