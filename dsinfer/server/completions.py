"""POST /v1/completions: the legacy text-completion API (prompt: a string, strings, token ids, or lists of
those); choice i*n + j is the j-th sample of prompt i."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from ..sampling import TokenLogprobs
from .errors import APIError
from .protocol import CompletionRequest
from .serving import Choice, Generation, ServerState, sampling_params

MAX_PROMPTS = 256


def _prompt_ids(state: ServerState, req: CompletionRequest) -> list[list[int]]:
    prompts = req.prompts()
    if not prompts:
        raise APIError(400, "prompt must be a string, a list of strings, token ids, or a list of token-id lists, "
                            "and not empty", "prompt")
    if len(prompts) * req.n > MAX_PROMPTS:
        raise APIError(400, f"{len(prompts)} prompts x n={req.n} is more than {MAX_PROMPTS} choices", "prompt")
    vocab = state.tokenizer.vocab_size
    out = []
    for p in prompts:
        ids = state.tokenizer.encode(p) if isinstance(p, str) else p
        if not ids:
            raise APIError(400, "a prompt is empty", "prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        out.append(ids)
    return out


async def create_completion(state: ServerState, req: CompletionRequest, request: Request):
    state.check_model(req.model)
    if req.echo:
        raise APIError(400, "echo is not supported", "echo")
    prompts = _prompt_ids(state, req)
    gen = Generation(state, "cmpl")
    gen.num_prompt_tokens = sum(len(ids) for ids in prompts)
    requests = [(ids, sampling_params(state, req, len(ids), req.max_tokens, req.logprobs, j, "prompt"),
                 Choice(i * req.n + j, i)) for i, ids in enumerate(prompts) for j in range(req.n)]
    state.acquire()
    streaming = False
    try:
        await gen.start(requests)
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            streaming = True
            return gen.event_stream(_chunks(state, gen, req.logprobs is not None, include_usage))
        if not await gen.collect(request):
            return JSONResponse({}, status_code=499)
        return JSONResponse(_response(state, gen, req.logprobs is not None))
    finally:
        if not streaming:
            gen.close()


def _logprobs(state: ServerState, entries: list[TokenLogprobs], offset: int = 0) -> dict:
    """OpenAI's legacy shape: parallel lists of tokens, their logprobs, {token: logprob} tops and text offsets."""
    tokens = [state.token_text(e.token_id) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{state.token_text(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}


def _response(state: ServerState, gen: Generation, want_logprobs: bool) -> dict:
    choices = [{"index": c.index, "text": "".join(c.text),
                "logprobs": _logprobs(state, c.logprobs) if want_logprobs else None,
                "finish_reason": c.finish_reason} for c in gen.choices]
    return {"id": gen.id, "object": "text_completion", "created": gen.created, "model": state.model_name,
            "choices": choices, "usage": gen.usage()}


async def _chunks(state: ServerState, gen: Generation, want_logprobs: bool, include_usage: bool) -> AsyncIterator[dict]:
    def chunk(choices: list[dict], usage: dict | None = None) -> dict:
        return gen.chunk("text_completion", choices, include_usage, usage)

    offsets = [0] * len(gen.choices)
    async for choice, out, _, text in gen.outputs():
        if text or out.finished or (want_logprobs and out.logprobs is not None):
            logprobs = None
            if want_logprobs and out.logprobs is not None:
                logprobs = _logprobs(state, [out.logprobs], offsets[choice.index])
                offsets[choice.index] += len(logprobs["tokens"][0])
            yield chunk([{"index": choice.index, "text": text, "logprobs": logprobs,
                          "finish_reason": choice.finish_reason if out.finished else None}])
    if include_usage:
        yield chunk([], gen.usage())
