"""POST /v1/chat/completions: a conversation through the checkpoint's chat template, answered whole or streamed;
thinking models get the reasoning split off into `reasoning_content`, and with `tools` the calls the model writes
come back as `tool_calls` (tool_calls.py)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from ..sampling import TokenLogprobs
from .errors import APIError
from .protocol import ChatCompletionRequest
from .raw_text import RawText
from .reasoning import ReasoningParser, prompt_opens_thinking
from .serving import Choice, Generation, ServerState, sampling_params
from .tool_calls import ToolCallParser

log = logging.getLogger("dsinfer.server")
RESERVED_TEMPLATE_KWARGS = ("messages", "add_generation_prompt", "bos_token", "eos_token")
THINKING_KWARGS = ("thinking", "enable_thinking")


def _use_tools(req: ChatCompletionRequest) -> bool:
    """Whether the tools go into the prompt and the completion is parsed for calls; 400 for what dsinfer cannot
    honour (it does not constrain generation, so it cannot force a call)."""
    choice = req.tool_choice
    if choice is not None and not isinstance(choice, str):
        raise APIError(400, f"tool_choice naming a function ({choice.function.name!r}) is not supported: dsinfer "
                            "cannot force a call; use \"auto\" or \"none\"", "tool_choice", "unsupported_value")
    if choice == "required":
        raise APIError(400, 'tool_choice "required" is not supported: dsinfer cannot force a call; use "auto" or '
                            '"none"', "tool_choice", "unsupported_value")
    if not req.tools:
        if choice == "auto":
            raise APIError(400, 'tool_choice "auto" needs tools', "tool_choice", "invalid_value")
        return False
    names = [t.function.name for t in req.tools]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise APIError(400, f"tools define the function(s) {', '.join(dup)} more than once", "tools",
                       "invalid_value")
    return choice != "none"


def _render(state: ServerState, req: ChatCompletionRequest) -> tuple[list[int], bool, bool]:
    """Prompt ids, whether the completion starts inside a <think> block, and whether it is parsed for tool calls.
    Tools reach the template as HF's apply_chat_template passes them (the `tools` variable; the V4 encoder's
    `tools` argument)."""
    kwargs = dict(req.chat_template_kwargs or {})
    if reserved := [k for k in kwargs if k in RESERVED_TEMPLATE_KWARGS]:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(reserved)}", "chat_template_kwargs")
    use_tools = _use_tools(req)
    if use_tools:
        if "tools" in kwargs:
            raise APIError(400, "tools given twice: in tools and in chat_template_kwargs", "chat_template_kwargs")
        kwargs["tools"] = req.template_tools()
        template = state.tokenizer.chat_template or ""
        if state.tokenizer.chat_format == "jinja" and "tools" not in template and not state.warned_tools:
            state.warned_tools = True
            log.warning("this checkpoint's chat template ignores `tools`: the model is not told about them")
    messages = req.template_messages()
    try:
        text = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
        ids = state.tokenizer.encode_chat(messages, add_generation_prompt=True, **kwargs)
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e), "messages") from None
    thinking = any(kwargs.get(k) is True for k in THINKING_KWARGS) or prompt_opens_thinking(text)
    return ids, thinking, use_tools


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, request: Request):
    state.check_model(req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    ids, thinking, use_tools = _render(state, req)
    max_tokens = req.max_completion_tokens or req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    gen = Generation(state, "chatcmpl")
    gen.num_prompt_tokens = len(ids)
    requests = []
    for i in range(req.n):
        params = sampling_params(state, req, len(ids), max_tokens, logprobs, i, "messages")
        choice = Choice(i, 0, ReasoningParser() if thinking else None)
        if use_tools:
            choice.tools = ToolCallParser(state.tool_format)
            choice.raw_text = RawText(state.tokenizer, params.stop)
        requests.append((ids, params, choice))
    state.acquire()
    streaming = False
    try:
        await gen.start(requests)
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            streaming = True
            return gen.event_stream(_chunks(state, gen, req.logprobs, include_usage))
        if not await gen.collect(request):
            return JSONResponse({}, status_code=499)
        return JSONResponse(_response(state, gen, req.logprobs))
    finally:
        if not streaming:
            gen.close()


def _logprobs(state: ServerState, entries: list[TokenLogprobs]) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        text = state.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
    return {"content": [item(e.token_id, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def _response(state: ServerState, gen: Generation, want_logprobs: bool) -> dict:
    choices = []
    for c in gen.choices:
        message = {"role": "assistant", "content": "".join(c.text)}
        if c.reasoning is not None:
            message["reasoning_content"] = "".join(c.reasoning_text)
        if c.tool_calls:
            message["content"] = message["content"] or None
            message["tool_calls"] = c.tool_calls
        choices.append({"index": c.index, "message": message,
                        "logprobs": _logprobs(state, c.logprobs) if want_logprobs else None,
                        "finish_reason": c.finish_reason})
    return {"id": gen.id, "object": "chat.completion", "created": gen.created, "model": state.model_name,
            "choices": choices, "usage": gen.usage()}


async def _chunks(state: ServerState, gen: Generation, want_logprobs: bool, include_usage: bool) -> AsyncIterator[dict]:
    def chunk(choices: list[dict], usage: dict | None = None) -> dict:
        return gen.chunk("chat.completion.chunk", choices, include_usage, usage)

    for c in gen.choices:
        yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    async for choice, out, reasoning, content in gen.outputs():
        logprobs = _logprobs(state, [out.logprobs]) if want_logprobs and out.logprobs is not None else None
        deltas = ([{"reasoning_content": reasoning}] if reasoning else []) + ([{"content": content}] if content else [])
        if logprobs and not deltas:
            deltas = [{"content": ""}]
        for j, delta in enumerate(deltas):
            yield chunk([{"index": choice.index, "delta": delta, "logprobs": logprobs if j == len(deltas) - 1 else None,
                          "finish_reason": None}])
        if out.finished:
            for k, call in enumerate(choice.tool_calls):
                yield chunk([{"index": choice.index, "delta": {"tool_calls": [{"index": k} | call]},
                              "logprobs": None, "finish_reason": None}])
            yield chunk([{"index": choice.index, "delta": {}, "logprobs": None,
                          "finish_reason": choice.finish_reason}])
    if include_usage:
        yield chunk([], gen.usage())
