"""Serving: one base model, the deltas of a folder, an OpenAI-compatible API (`deltatune serve`).

engine.py runs continuous batching with a delta per row; batch.py holds the running rows' cache;
deltas.py finds and checks delta folders; sampling.py chooses tokens and releases text; app.py
is the HTTP API (FastAPI), protocol.py its request and response shapes, metrics.py Prometheus;
launch.py builds and runs it all. Needs the `serve` extra: checked first, so a missing package
is named with the command that installs it."""
from ..extras import require

for _module, _package in (("fastapi", None), ("uvicorn", None), ("prometheus_client", "prometheus-client")):
    require(_module, "serve", "The server (deltatune serve)", _package)

from .launch import build_server, serve  # noqa: E402

__all__ = ["build_server", "serve"]
