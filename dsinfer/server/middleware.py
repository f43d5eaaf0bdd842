"""ASGI middleware: the API key check and the per-endpoint request counter (pure ASGI, so streaming responses
and client disconnects pass through untouched)."""

from __future__ import annotations

import json
import secrets

from .errors import error_body
from .metrics import ServerMetrics

OPEN_PATHS = ("/health",)                      # answered without an API key
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


class AccessMiddleware:
    def __init__(self, app, metrics: ServerMetrics, api_key: str | None = None):
        self.app, self.metrics, self.api_key = app, metrics, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"       # bounded label values
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.api_key is not None and path not in OPEN_PATHS and not self._authorized(scope):
                await _send_json(counting_send, 401, error_body(
                    401, "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                    code="invalid_api_key"))
                return
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.inc(1, endpoint, str(status["code"]))

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(),
                                                                             self.api_key.encode())
        return False


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
