"""OpenAI-compatible HTTP server: `dsinfer serve` (cli), the app factory, the engine step loop."""

from .app import create_app
from .config import ServerConfig

__all__ = ["create_app", "ServerConfig"]
