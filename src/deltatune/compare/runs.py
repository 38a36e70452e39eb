"""One run of a comparison: its run config written beside its folder (runs/ID.yaml), the run itself
(`deltatune train`'s recipe, resumable), and its record (runs/ID.json: metrics, size, time, memory).
A run whose record exists for the same config is done; a run without one starts again from its newest
checkpoint. With isolate, each run is its own process, so its peak memory is its own:

    python -m deltatune.compare RUNS/ID.yaml      (compare/__main__.py)
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .. import recipes
from ..config_file import load_run_config
from ..core.errors import ConfigError
from ..core.io import atomic_write
from ..recipes.common import for_task


@dataclass
class Run:
    method: str
    lr: float | None  # None: the run config's own learning rate
    seed: int
    raw: dict  # the whole run config
    folder: Path

    @property
    def spec_file(self) -> Path:
        return self.folder.with_name(self.folder.name + ".yaml")

    @property
    def record_file(self) -> Path:
        return self.folder.with_name(self.folder.name + ".json")

    def label(self) -> str:
        return f"{self.method} seed {self.seed}" + (f" lr {self.lr:g}" if self.lr is not None else "")


def cached(run: Run) -> dict | None:
    """The run's record, if it finished with this very config."""
    if not (run.record_file.is_file() and run.spec_file.is_file()):
        return None
    if yaml.safe_load(run.spec_file.read_text()) != run.raw:
        return None
    return json.loads(run.record_file.read_text())


def execute(run: Run, isolate: bool) -> dict:
    """Run it (in a child process with isolate) and return its record. A folder left by another config
    is replaced; one left by this config, interrupted, resumes from its newest checkpoint."""
    if run.spec_file.is_file() and yaml.safe_load(run.spec_file.read_text()) != run.raw:
        shutil.rmtree(run.folder, ignore_errors=True)  # the comparison's own folder, for a config now changed
        run.record_file.unlink(missing_ok=True)
    text = yaml.safe_dump(run.raw, sort_keys=False)
    atomic_write(run.spec_file, lambda t: Path(t).write_text(text))
    if not isolate:
        return run_spec(run.spec_file, measure_memory=False)
    child = subprocess.run([sys.executable, "-m", "deltatune.compare", str(run.spec_file)])
    if child.returncode != 0 or not run.record_file.is_file():
        raise ConfigError(f"The run {run.label()} failed (exit code {child.returncode}; its output is above, its "
                          f"folder {run.folder}). Fix the cause and run the comparison again: finished runs are kept.")
    return json.loads(run.record_file.read_text())


def run_spec(spec_file: Path, measure_memory: bool = True) -> dict:
    """Run the run config in spec_file (resuming its folder) and write its record beside it."""
    spec_file = Path(spec_file)
    cfg = load_run_config(raw=yaml.safe_load(spec_file.read_text()), overrides=["train.resume=true"])
    cfg.train.progress = False
    started = time.time()
    results = recipes.run(cfg)
    record = summarise(cfg, results, time.time() - started)
    if measure_memory:  # this process ran nothing else
        record["peak_rss_mb"] = round(_peak_rss_mb(), 1)
        if torch.cuda.is_available():
            record["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    text = json.dumps(record, indent=2)
    atomic_write(spec_file.with_suffix(".json"), lambda t: Path(t).write_text(text))
    return record


def summarise(cfg, results: dict, wall_seconds: float) -> dict:
    """The figures a comparison reports for one run, from its results.json."""
    metric = for_task(cfg.train, cfg.task).metric
    test, validation = results.get("test") or {}, results.get("validation") or {}
    trainable = results.get("trainable") or {}
    delta = Path(results["delta"]) if results.get("delta") else None
    fit = results.get("fit") or {}
    return {"seed": cfg.train.seed, "lr": fit.get("lr", cfg.train.lr), "metric": metric,
            "test": test.get(metric), "validation": validation.get(metric), "test_metrics": test,
            "validation_metrics": validation, "trainable": trainable.get("trainable"),
            "total": trainable.get("total"), "percent": trainable.get("percent"),
            "train_seconds": fit.get("train_seconds"), "wall_seconds": round(wall_seconds, 1),
            "delta_bytes": sum(f.stat().st_size for f in delta.iterdir() if f.is_file())
            if delta and delta.is_dir() else None,
            "peak_rss_mb": None, "folder": cfg.output_dir}


def _peak_rss_mb() -> float:
    import resource  # POSIX only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
