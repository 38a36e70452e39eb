"""The first write into a run folder. `deltatune train` validates the config, model, data and
targets before anything touches the output folder: it registers what starting the run means
(moving an old run aside under --overwrite, writing run.yaml) with `deferred(action)`, and the
first writer (the Trainer's first file, or a recipe's final delta/results) calls `begin_writing()`,
which runs that action once. Outside `deferred`, begin_writing() does nothing."""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable

_PENDING: ContextVar[Callable[[], None] | None] = ContextVar("deltatune_run_start", default=None)


@contextlib.contextmanager
def deferred(action: Callable[[], None]):
    token = _PENDING.set(action)
    try:
        yield
    finally:
        _PENDING.reset(token)


def begin_writing() -> None:
    action = _PENDING.get()
    if action is not None:
        _PENDING.set(None)
        action()
