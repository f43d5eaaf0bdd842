"""What the chat and completion endpoints share: server state, request limits, turning a request into engine
requests (n per prompt), collecting or streaming their outputs, aborting them when the client goes away."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine.engine import StepOutput
from ..sampling import SamplingParams, TokenLogprobs
from .config import ServerConfig
from .engine_loop import EngineLoop, EngineStopped, RequestHandle, iterate
from .errors import APIError, error_body
from .protocol import SamplingFields
from .raw_text import RawText
from .reasoning import ReasoningParser
from .tool_calls import ToolCallParser

DISCONNECT_POLL_S = 0.5
log = logging.getLogger("dsinfer.server")


class ServerState:
    """Everything a handler needs; one per app."""

    def __init__(self, loop: EngineLoop, config: ServerConfig):
        self.loop, self.config = loop, config
        self.tokenizer = loop.engine.tokenizer
        self.max_model_len = loop.engine.max_model_len
        self.model_name = config.served_model_name
        self.tool_format = "deepseek_v4" if self.tokenizer.chat_format == "deepseek_v4" else "deepseek_v3"
        self.warned_tools = False           # logged once: the chat template ignores tools
        self.created = int(time.time())
        self.num_active = 0                 # HTTP generation requests in flight (event loop only: no lock)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")

    def acquire(self) -> None:
        if self.num_active >= self.config.max_concurrent_requests:
            raise APIError(429, f"too many concurrent requests (at most {self.config.max_concurrent_requests}); "
                                "retry later", code="too_many_requests")
        self.num_active += 1

    def release(self) -> None:
        self.num_active -= 1

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def sampling_params(state: ServerState, req: SamplingFields, prompt_len: int, max_tokens: int | None,
                    logprobs: int | None, index: int, prompt_param: str) -> SamplingParams:
    """SamplingParams of choice `index`; a seeded request gives choice i the seed + i."""
    limit = state.max_model_len
    if max_tokens is not None and max_tokens > limit:
        raise APIError(400, f"max_tokens is {max_tokens}; the context holds {limit} tokens", "max_tokens",
                       "invalid_value")
    if prompt_len >= limit:
        raise APIError(400, f"the prompt has {prompt_len} tokens; the context holds {limit} (prompt plus at least "
                            "one generated token)", prompt_param, "context_length_exceeded")
    try:
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
            max_tokens=max_tokens or limit - prompt_len, stop=() if req.stop is None else req.stop,
            seed=None if req.seed is None else req.seed + index, ignore_eos=req.ignore_eos, logprobs=logprobs)
    except ValueError as e:
        raise APIError(400, str(e), None, "invalid_value") from None


@dataclass
class Choice:
    """The accumulated output of one engine request. With `tools` the text comes from `raw_text` (special tokens
    kept), and the content after any reasoning goes through the tool-call parser."""

    index: int
    prompt_index: int
    reasoning: ReasoningParser | None = None
    tools: ToolCallParser | None = None
    raw_text: RawText | None = None
    text: list[str] = field(default_factory=list)
    reasoning_text: list[str] = field(default_factory=list)
    tool_calls: list[dict] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, out: StepOutput) -> tuple[str, str]:
        """Take one output; returns its (reasoning, content) text delta. Tool calls appear in `tool_calls` with the
        last output."""
        self.num_tokens += len(out.new_token_ids)
        if out.logprobs is not None:
            self.logprobs.append(out.logprobs)
        new_text = out.new_text if self.raw_text is None else self.raw_text.feed(out)
        reasoning, content = ("", new_text) if self.reasoning is None else self.reasoning.feed(new_text)
        if out.finished:
            self.finish_reason = out.finish_reason
            if self.reasoning is not None:
                r, c = self.reasoning.flush()
                reasoning, content = reasoning + r, content + c
        if self.tools is not None:
            content = self.tools.feed(content)
            if out.finished:
                rest, self.tool_calls = self.tools.flush()
                content += rest
                if self.tool_calls:
                    self.finish_reason = "tool_calls"
        self.reasoning_text.append(reasoning)
        self.text.append(content)
        return reasoning, content


class Generation:
    """The engine requests behind one HTTP request."""

    def __init__(self, state: ServerState, kind: str):
        self.state, self.kind = state, kind
        self.id = f"{kind}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.handles: list[RequestHandle] = []
        self.choices: list[Choice] = []
        self.num_prompt_tokens = 0
        self._closed = False

    async def start(self, requests: list[tuple[list[int], SamplingParams, Choice]]) -> None:
        """Submit every engine request; a 400 if the engine refuses any (the others are aborted)."""
        outputs: asyncio.Queue = asyncio.Queue()
        loop = self.state.loop
        for ids, params, choice in requests:
            self.handles.append(loop.submit(ids, params, outputs))
            self.choices.append(choice)
        try:
            results = await asyncio.gather(*(h.accepted for h in self.handles), return_exceptions=True)
        except asyncio.CancelledError:
            self.abort()
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self.abort()
            if isinstance(errors[0], EngineStopped):
                raise APIError(503, str(errors[0]), code="shutting_down")
            raise APIError(400, str(errors[0]), None, "invalid_value")

    def abort(self) -> None:
        for h in self.handles:
            self.state.loop.abort(h)

    def usage(self) -> dict:
        completion = sum(c.num_tokens for c in self.choices)
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.num_prompt_tokens + completion}

    def chunk(self, obj: str, choices: list[dict], include_usage: bool, usage: dict | None = None) -> dict:
        """One streamed body of `obj` ("chat.completion.chunk", "text_completion"); with `include_usage` every
        chunk carries a usage field, null until the last one."""
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.state.model_name,
                "choices": choices}
        if include_usage:
            body["usage"] = usage
        return body

    async def outputs(self) -> AsyncIterator[tuple[Choice, StepOutput, str, str]]:
        async for i, out in iterate(self.handles):
            choice = self.choices[i]
            reasoning, content = choice.add(out)
            yield choice, out, reasoning, content

    async def collect(self, request: Request) -> bool:
        """Run every choice to the end; False (and everything aborted) if the client disconnected first."""
        async def drain():
            async for _ in self.outputs():
                pass

        async def watch():
            while not await request.is_disconnected():
                await asyncio.sleep(DISCONNECT_POLL_S)

        work, watcher = asyncio.create_task(drain()), asyncio.create_task(watch())
        try:
            done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                work.result()
                return True
            return False
        finally:
            for task in (work, watcher):
                task.cancel()
            self.abort()

    def close(self) -> None:
        """Abort whatever is unfinished and free the request slot (idempotent)."""
        self.abort()
        if not self._closed:
            self._closed = True
            self.state.release()

    def event_stream(self, chunks: AsyncIterator[dict]) -> StreamingResponse:
        """A response streaming `chunks` as server-sent events, then `[DONE]`. However it ends (finished, client
        gone, cancelled before the first chunk) the engine requests are aborted and the slot is freed."""
        async def events():
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            except Exception as e:          # the headers are out; report in-band
                log.exception("generation %s failed mid-stream", self.id)
                yield f"data: {json.dumps(error_body(500, f'generation failed ({type(e).__name__})'))}\n\n"
            finally:
                self.close()
            yield "data: [DONE]\n\n"

        return _ClosingStream(events(), self.close)


class _ClosingStream(StreamingResponse):
    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
