"""Ctrl-C during training: the first SIGINT asks the loop to stop at the next optimizer-step
boundary (it then writes a checkpoint and last/, and raises TrainingInterrupted); a second
SIGINT raises KeyboardInterrupt at once, as Python's default handler does."""
from __future__ import annotations

import signal
import sys
import threading


class StopRequest:
    """A context manager that installs the graceful SIGINT handler for its duration, when it can:
    in the main thread and over Python's default handler (a caller's own handler is left alone)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)  # the second Ctrl-C aborts at once
        print("\nCtrl-C: stopping after this step and writing a checkpoint (Ctrl-C again aborts at once).",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
