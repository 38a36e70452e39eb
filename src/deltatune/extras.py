"""Optional dependencies, each installed by a pip extra of deltatune.

`import deltatune` needs none of them: a feature imports its package when it runs, through
`require`, so a missing package is reported with the extra that installs it.

- `plots`: matplotlib and tensorboard, for a run's curves.png and TensorBoard event files;
- `recipes`: sacrebleu and faiss-cpu, for BLEU scores and nearest-neighbour demonstrations (ipt);
- `data`: datasets, for reading JSONL/CSV/Parquet files and saved datasets;
- `serve`: fastapi, uvicorn and prometheus-client, for `deltatune serve`;
- `quant`: bitsandbytes, for LoRA on a base loaded 4-bit (NF4 / FP4) or 8-bit (QLoRA, docs/qlora.md);
  only a model already quantized imports it, so no feature here calls `require` for it;
- `all`: all of the above.
"""
from __future__ import annotations

import importlib

from .core.errors import DeltaError


class MissingExtraError(DeltaError, ImportError):
    """An optional package a feature needs is not installed (or does not import)."""


def install_command(extra: str) -> str:
    return f"pip install 'deltatune[{extra}]'"


def missing_message(package: str, extra: str, feature: str, error: ImportError) -> str:
    """E.g. "BLEU scoring needs sacrebleu, which is not installed: pip install 'deltatune[recipes]'"."""
    absent = isinstance(error, ModuleNotFoundError)
    why = "which is not installed" if absent else f"which fails to import ({error})"
    return f"{feature} needs {package}, {why}: {install_command(extra)}"


def require(module: str, extra: str, feature: str, package: str | None = None):
    """Import and return `module`, or raise MissingExtraError naming the extra that installs it.
    `package` is the pip name when it differs from the module's (faiss -> faiss-cpu)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(missing_message(package or module.split(".")[0], extra, feature, e)) from e
