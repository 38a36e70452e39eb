"""Building and running the server: the base model, its tokenizer, the delta folder, the engine
and the app (build_server), and uvicorn around them (serve)."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch
import uvicorn
from transformers import AutoModelForCausalLM

from ..core.model import DeltaModel
from ..data.models import load_model, load_tokenizer, resolve_path
from .app import ServeOptions, create_app
from .deltas import DeltaStore
from .engine import Engine


def build_server(base: str, deltas: str, name: str | None = None, device: str = "auto", dtype: str = "float32",
                 max_batch: int = 32, max_resident: int = 8, merge_single: bool = False, **options):
    """(FastAPI app, engine) serving `base` (a folder or a built-in name) with the deltas in `deltas`."""
    store = DeltaStore(deltas)  # checked before the model loads
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    base_model = load_model(base, AutoModelForCausalLM, dtype=getattr(torch, dtype)).to(device).eval()
    tokenizer = load_tokenizer(base)
    model = DeltaModel(base_model)
    context = int(getattr(base_model.config, "max_position_embeddings", 0) or 2048)
    opts = ServeOptions(name=name or _default_name(base, resolve_path(base, weights=False)), **options)
    opts.max_context = min(opts.max_context or context, context)
    engine = Engine(model, tokenizer, store, max_batch=max_batch, max_resident=max_resident,
                    max_context=opts.max_context, merge_single=merge_single)
    return create_app(engine, tokenizer, store, opts), engine


def serve(host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0, **kwargs) -> int:
    """Run the server until SIGINT/SIGTERM: in-flight requests finish (up to shutdown_timeout seconds)."""
    app, engine = build_server(**kwargs)
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=shutdown_timeout,
                            log_level=os.environ.get("DELTATUNE_LOG_LEVEL", "info"))
    server = uvicorn.Server(config)
    if threading.current_thread() is threading.main_thread():
        # uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the handler it
        # found: a no-op one here, so that a graceful stop exits with 0
        previous = signal.signal(signal.SIGTERM, lambda sig, frame: None)
        try:
            server.run()
        finally:
            signal.signal(signal.SIGTERM, previous)
    else:
        server.run()
    return 0


def _default_name(base: str, path: Path) -> str:
    return base if not Path(base).expanduser().is_dir() else path.name
