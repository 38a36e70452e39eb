"""Exception types. Each names the problem and, where there is one, the fix."""
import difflib


class DeltaError(Exception):
    """Base class of every error deltatune raises on purpose."""


class UnknownMethodError(DeltaError, KeyError):
    def __str__(self):  # KeyError would quote the message
        return self.args[0]


class ConfigError(DeltaError, ValueError):
    """A config key or value is wrong."""


class TargetNotFoundError(DeltaError, ValueError):
    """A target pattern matched no module of the model."""


class IncompatibleDeltaError(DeltaError, ValueError):
    """A saved delta does not fit this base model (other architecture or shapes)."""


class CorruptFileError(DeltaError, ValueError):
    """A delta file cannot be read, or is in a format we refuse (pickle)."""


def closest(word, candidates, n=3):
    """Up to n candidates close to `word`, for 'did you mean' hints."""
    return difflib.get_close_matches(str(word), [str(c) for c in candidates], n=n, cutoff=0.5)


def did_you_mean(word, candidates):
    near = closest(word, candidates)
    return f" Did you mean {', '.join(repr(c) for c in near)}?" if near else ""


class TrainingInterrupted(DeltaError):
    """Training stopped on request (Ctrl-C) after writing a resumable checkpoint."""

    def __init__(self, message: str, step: int, output_dir: str):
        super().__init__(message)
        self.step, self.output_dir = step, output_dir
