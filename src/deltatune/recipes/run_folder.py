"""Output folders of `deltatune train`: never replaced silently, never written before the run is
known to start. `prepare(cfg, overwrite, allow_changes)` only checks the folder and returns the
action that starts the run (moving an old run aside under --overwrite, writing run.yaml); the
recipe runs under `train.run_start.deferred(action)`, so the action happens at the first write,
after the config, model, data and targets were validated by building the job."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import yaml

from ..core.errors import ConfigError
from .common import save_run_config

RUN_FILES = ("run.yaml", "results.json", "metrics.jsonl", "checkpoints", "final", "best", "last")
# keys a resumed run may change freely: how it is shown and saved, and its budget (the run goes on)
FREE_ON_RESUME = {"train.resume", "train.progress", "train.tensorboard", "train.plot", "train.num_workers",
                  "train.keep_checkpoints", "train.checkpoint_every", "train.epochs", "train.max_steps"}


def flat(d, prefix="") -> dict:
    """{"train.lr": 1e-3, ...} from a nested run config dict (lists stay values)."""
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def changed_keys(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every run-config key whose value differs (FREE_ON_RESUME aside)."""
    a, b = flat(old), flat(new)
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(set(a) | set(b))
            if k not in FREE_ON_RESUME and a.get(k) != b.get(k)]


def describe(out: Path) -> str:
    names = [n + ("/" if (out / n).is_dir() else "") for n in RUN_FILES if (out / n).exists()]
    state = "a finished run" if (out / "results.json").exists() else "an unfinished run"
    return f"{state} ({', '.join(names)})"


def prepare(cfg, overwrite: bool = False, allow_changes: bool = False) -> Callable[[], None]:
    """Check cfg.output_dir for this run; return the action that starts it (called at the first write)."""
    out = Path(cfg.output_dir)
    resume = cfg.train.resume
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume contradict each other: resume continues the run in "
                          f"{out}, overwrite replaces it. Pass one of them.")
    content = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file; set output_dir to a folder.")
    is_run = any((out / n).exists() for n in RUN_FILES)
    if content and not is_run:
        raise ConfigError(f"output_dir {out} is not empty and holds no deltatune run ({', '.join(content[:5])}"
                          f"{', ...' if len(content) > 5 else ''}); choose a new or empty folder (output_dir=DIR).")
    if is_run and resume:
        saved = out / "run.yaml"
        if saved.is_file():
            changes = changed_keys(yaml.safe_load(saved.read_text()) or {}, cfg.to_dict())
            if changes and not allow_changes:
                raise ConfigError(f"Resuming {out} with a config that differs from its run.yaml: "
                                  f"{'; '.join(changes)}. Resume with the same config, pass --allow-changes "
                                  "to continue with these changes, or start a new run (output_dir=DIR).")
    elif is_run and not overwrite:
        raise ConfigError(f"output_dir {out} holds {describe(out)}. Pass --resume to continue it, --overwrite "
                          "to replace it, or choose another folder (output_dir=DIR).")

    def start() -> None:
        if is_run and overwrite:
            aside = out.parent / f".{out.name}.replaced-{os.getpid()}"
            os.replace(out, aside)  # the old run goes only now that the new one has been validated
            out.mkdir(parents=True)
            shutil.rmtree(aside)
        save_run_config(cfg, out / "run.yaml")
    return start
