"""OpenAI-compatible HTTP server: `dsinfer serve` (cli.py), the app factory (app.py), the engine step loop.

Nothing here imports FastAPI at package import, so the rest of dsinfer works without the server extra."""
