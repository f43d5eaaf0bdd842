"""The FastAPI app: routes, error handlers, API-key and metrics middleware, and the engine loop's lifetime."""

from __future__ import annotations

import contextlib
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from ..assets import default_model_path
from ..config import EngineConfig
from ..engine import Engine
from .chat import create_chat_completion
from .completions import create_completion
from .config import ServerConfig
from .engine_loop import EngineLoop
from .errors import install_error_handlers
from .metrics import ServerMetrics
from .middleware import AccessMiddleware
from .protocol import ChatCompletionRequest, CompletionRequest
from .serving import ServerState


def create_app(engine_or_config: Engine | EngineConfig | None = None, server_config: ServerConfig | None = None,
               model_path: str | Path | None = None) -> FastAPI:
    """An app serving `engine` (or one built from an EngineConfig and `model_path`, default the bundled model).
    The engine loop thread runs while the app's lifespan does."""
    server_config = server_config or ServerConfig()
    engine = engine_or_config
    if not isinstance(engine, Engine):
        engine = Engine(model_path if model_path is not None else default_model_path(), engine_or_config)
    metrics = ServerMetrics()
    loop = EngineLoop(engine, metrics)
    state = ServerState(loop, server_config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loop.start()
        try:
            yield
        finally:
            loop.stop()

    app = FastAPI(title="dsinfer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(AccessMiddleware, metrics=metrics, api_key=server_config.api_key)

    @app.get("/health")
    async def health():
        if not loop.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "dsinfer", "max_model_len": state.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await create_chat_completion(state, body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await create_completion(state, body, request)

    return app
