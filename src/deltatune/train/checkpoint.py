"""Resumable checkpoints, written atomically and without pickle.

A checkpoint is a directory `output_dir/checkpoints/checkpoint-<step>` holding
  delta/<name>/          every delta of the model in the delta file format
  model_state.safetensors  the exact training state: the deltas' parameters and buffers and any
                         other trainable parameter (all of a plain nn.Module's state)
  optimizer.safetensors + optimizer.json, scheduler.json
  rng-<rank>.json + rng-<rank>.safetensors   python, numpy, torch CPU and per-device RNG states
  best_state.safetensors the best delta so far (put back at the end: TrainConfig.load_best_at_end)
  trainer_state.json     step, data position (epoch, micro-batch), early stopping, history,
                         fp16's loss scale
It is assembled in a temporary directory and renamed into place, so a directory
named checkpoint-<step> is always complete, whenever the process is killed."""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..core.errors import ConfigError, CorruptFileError
from ..core.io import untied
from . import sharded

STATE_NAME = "trainer_state.json"
ORDER_NAME = "order.json"  # delta/: the names in attach order
BEST_NAME = "best_state.safetensors"  # the best delta so far (TrainConfig.load_best_at_end)
_NAME = re.compile(r"^checkpoint-(\d+)$")


# -- atomic directories ----------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*"), reverse=True):
        _fsync(p)
    _fsync(root)


@contextlib.contextmanager
def atomic_directory(path):
    """Yield a temporary directory; on success it replaces `path` in one rename
    (an older `path` is moved aside first and removed after)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1))


# -- finding ---------------------------------------------------------------
def checkpoints_dir(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first (temporary and half-removed directories are skipped)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_NAME).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def clean_stale(output_dir) -> None:
    """Remove leftovers of checkpoints that a killed run was writing or replacing."""
    root = checkpoints_dir(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)
    if Path(output_dir).is_dir():  # best/ and last/ being replaced (atomic_directory)
        for p in Path(output_dir).iterdir():
            if p.is_dir() and p.name.startswith((".best.", ".last.")):
                shutil.rmtree(p, ignore_errors=True)


# -- model -----------------------------------------------------------------
def save_model_state(model, directory: Path) -> None:
    """The deltas in the delta file format (for people and tools), and the exact training state:
    every piece's parameters and buffers (a DeltaModel's state_dict) plus trainable parameters
    outside the deltas; a plain nn.Module's whole state dict."""
    state = dict(model.state_dict())
    if hasattr(model, "delta_state") and getattr(model, "configs", None):
        for name in model.configs:
            model.save_pretrained(directory / "delta" / name, names=[name])
        # attach order: a delta that builds on others (a fusion on its adapters) is re-created after them
        (directory / "delta" / ORDER_NAME).write_text(json.dumps(list(model.configs)))
        state.update({n: p for n, p in model.named_parameters() if p.requires_grad and n not in state})
    save_file(untied(state), str(directory / "model_state.safetensors"))


def load_model_state(model, directory: Path) -> None:
    deltas = directory / "delta"
    if deltas.is_dir():  # deltas made during training (EMA, snapshots) are re-created first
        order = deltas / ORDER_NAME
        names = json.loads(order.read_text()) if order.is_file() else sorted(p.name for p in deltas.iterdir())
        for name in names:
            if (deltas / name).is_dir() and name not in model.configs:
                model.load_delta(deltas / name, name=name, trainable=False)
    try:
        # exact: the file format may be lossy (sparse deltas), the raw state is not
        state = load_file(str(directory / "model_state.safetensors"))
        model.load_state_dict(sharded.shard_like(model, state), strict=True)
    except RuntimeError as e:
        raise ConfigError(f"Checkpoint {directory} does not fit this model ({e}); resume with the model and "
                          "deltas the run was started with.") from None


# -- optimizer / scheduler -------------------------------------------------
def save_optimizer(sd: dict, directory: Path) -> None:
    """Write an optimizer's state dict (whole tensors: sharded.full_optimizer_state)."""
    tensors, plain = {}, {}
    for idx, st in sd["state"].items():
        plain[str(idx)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                plain[str(idx)][k] = v
    save_file(tensors, str(directory / "optimizer.safetensors"))
    _write_json(directory / "optimizer.json", {"param_groups": sd["param_groups"], "state": plain})


def load_optimizer(optimizer, directory: Path) -> None:
    meta = json.loads((directory / "optimizer.json").read_text())
    tensors = load_file(str(directory / "optimizer.safetensors"))
    state = {int(i): dict(v) for i, v in meta["state"].items()}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# -- random number generators ----------------------------------------------
def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def saving_mode(model):
    """Write files without touching the run: evaluation mode (a delta's file form must not be a
    random sample, e.g. of stochastic gates), and every RNG state restored afterwards."""
    plain, tensors = rng_state()
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)
        set_rng_state(plain, tensors)


def save_rng(directory: Path, rank: int) -> None:
    plain, tensors = rng_state()
    save_file(tensors, str(directory / f"rng-{rank}.safetensors"))
    _write_json(directory / f"rng-{rank}.json", plain)


def load_rng(directory: Path, rank: int) -> None:
    plain = json.loads((directory / f"rng-{rank}.json").read_text())
    set_rng_state(plain, load_file(str(directory / f"rng-{rank}.safetensors")))


# -- whole checkpoints -----------------------------------------------------
def write_checkpoint(accelerator, output_dir, state: dict, model, optimizer, scheduler, keep: int,
                     best_state: dict | None = None) -> Path:
    """Every process writes its RNG state; the main process writes the rest and renames.
    `best_state`: the tensors of the best delta so far (put back at the end of a resumed run).
    A sharded (FSDP2) model's state and optimizer state are gathered whole first, by every process."""
    root = checkpoints_dir(output_dir)
    final = root / f"checkpoint-{state['step']:08d}"
    tmp = root / f".tmp-checkpoint-{state['step']:08d}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_rng(tmp, accelerator.process_index)
    accelerator.wait_for_everyone()
    with sharded.full_tensors(model):
        optimizer_state = sharded.full_optimizer_state(optimizer)
        if main:
            with saving_mode(model):
                save_model_state(model, tmp)
    if main:
        save_optimizer(optimizer_state, tmp)
        _write_json(tmp / "scheduler.json", scheduler.state_dict())
        if best_state is not None:
            save_file(untied(best_state), str(tmp / BEST_NAME))
        _write_json(tmp / STATE_NAME, state)  # last: its presence marks a complete checkpoint
        _fsync_tree(tmp)
        if final.exists():  # a fresh run reaching a step an earlier run had saved
            old = root / f".old-{final.name}"
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)
        _fsync(root)
        for old in list_checkpoints(output_dir)[:-keep]:
            stale = root / f".old-{old.name}"
            os.replace(old, stale)
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def read_best_state(path: Path) -> dict | None:
    """The best delta's tensors a checkpoint holds (None when it holds none)."""
    file = Path(path) / BEST_NAME
    return load_file(str(file)) if file.is_file() else None


def read_checkpoint(path: Path, accelerator, model, optimizer, scheduler) -> dict:
    """Load everything but the RNG states (restore_rng, called right before training goes on)."""
    try:
        state = json.loads((path / STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path / STATE_NAME} is unreadable ({e}); remove {path} to resume from an "
                               "older checkpoint.") from None
    if state["world_size"] != accelerator.num_processes:
        raise ConfigError(f"Checkpoint {path} was written by {state['world_size']} process(es) but this run has "
                          f"{accelerator.num_processes}: resume with the same number of processes (the global "
                          "batch and the data order depend on it), or start a fresh run.")
    load_model_state(model, path)
    load_optimizer(optimizer, path)
    sharded.shard_optimizer_state(optimizer)
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    return state
