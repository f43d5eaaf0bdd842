"""ServerConfig: the HTTP-side knobs (the engine's are EngineConfig)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"                  # address to listen on
    port: int = 8000                         # TCP port, 0..65535 (0: any free port)
    api_key: str | None = None               # when set, every endpoint but /health needs "Authorization: Bearer KEY"
    served_model_name: str = "dsinfer"       # the name /v1/models lists and requests must use (or omit)
    max_concurrent_requests: int = 512      # generation requests in flight; more get 429, >= 1
    graceful_shutdown_s: float = 10.0        # on SIGINT/SIGTERM, how long running requests may finish, >= 0

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must be a non-empty string (or not given)")
        if not self.served_model_name:
            raise ValueError("served_model_name must be a non-empty string")
        if self.max_concurrent_requests < 1:
            raise ValueError(f"max_concurrent_requests must be at least 1, got {self.max_concurrent_requests}")
        if self.graceful_shutdown_s < 0:
            raise ValueError(f"graceful_shutdown_s must be >= 0, got {self.graceful_shutdown_s}")
