"""Resumable checkpoints, written atomically and without pickle.

A checkpoint is a directory `output_dir/checkpoints/checkpoint-<step>` holding
  delta/<name>/          every delta of the model in the delta file format
  trainable.safetensors  trainable parameters outside the deltas (all of a plain nn.Module's state)
  optimizer.safetensors + optimizer.json, scheduler.json, scaler.json (fp16 only)
  rng-<rank>.json + rng-<rank>.safetensors   python, numpy, torch CPU and per-device RNG states
  trainer_state.json     step, data position (epoch, micro-batch), early stopping, history
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
from ..core.io import read_delta

STATE_NAME = "trainer_state.json"
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


# -- model -----------------------------------------------------------------
def _delta_param_ids(model) -> set[int]:
    configs = getattr(model, "configs", None)
    if not configs or not hasattr(model, "delta_parameters"):
        return set()
    return {id(p) for name in configs for p in model.delta_parameters(name)}


def save_model_state(model, directory: Path) -> None:
    if hasattr(model, "delta_state") and getattr(model, "configs", None):
        for name in model.configs:
            model.save_pretrained(directory / "delta" / name, names=[name])
        in_deltas = _delta_param_ids(model)
        extra = {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_deltas}
    else:
        extra = dict(model.state_dict())
    if extra:
        tensors, seen = {}, set()
        for k, v in extra.items():
            v = v.detach().contiguous().cpu()
            tensors[k] = v.clone() if v.data_ptr() in seen else v  # tied weights: one copy per key
            seen.add(v.data_ptr())
        save_file(tensors, str(directory / "trainable.safetensors"))


def load_model_state(model, directory: Path) -> None:
    deltas = directory / "delta"
    if deltas.is_dir():
        for sub in sorted(p for p in deltas.iterdir() if p.is_dir()):
            if sub.name in model.configs:
                _, tensors = read_delta(sub)
                model._load_tensors(sub.name, tensors, source=sub)
            else:  # a delta made during training (e.g. a snapshot): bring it back as it was
                model.load_delta(sub, name=sub.name, trainable=False)
    extra = directory / "trainable.safetensors"
    if extra.exists():
        tensors = load_file(str(extra))
        params = dict(model.named_parameters())
        if hasattr(model, "delta_state"):
            unknown = sorted(set(tensors) - set(params))
            if unknown:
                raise ConfigError(f"Checkpoint {directory} has trainable parameters {unknown[:3]} that this model "
                                  "lacks: resume with the model the run was started with.")
            with torch.no_grad():
                for k, v in tensors.items():
                    params[k].copy_(v)
        else:
            model.load_state_dict(tensors, strict=True)


# -- optimizer / scheduler -------------------------------------------------
def save_optimizer(optimizer, directory: Path) -> None:
    sd = optimizer.state_dict()
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


def save_rng(directory: Path, rank: int) -> None:
    plain, tensors = rng_state()
    save_file(tensors, str(directory / f"rng-{rank}.safetensors"))
    _write_json(directory / f"rng-{rank}.json", plain)


def load_rng(directory: Path, rank: int) -> None:
    plain = json.loads((directory / f"rng-{rank}.json").read_text())
    set_rng_state(plain, load_file(str(directory / f"rng-{rank}.safetensors")))


# -- whole checkpoints -----------------------------------------------------
def write_checkpoint(accelerator, output_dir, state: dict, model, optimizer, scheduler, keep: int) -> Path:
    """Every process writes its RNG state; the main process writes the rest and renames."""
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
    if main:
        save_model_state(model, tmp)
        save_optimizer(optimizer, tmp)
        _write_json(tmp / "scheduler.json", scheduler.state_dict())
        if accelerator.scaler is not None:
            _write_json(tmp / "scaler.json", accelerator.scaler.state_dict())
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
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    if accelerator.scaler is not None and (path / "scaler.json").exists():
        accelerator.scaler.load_state_dict(json.loads((path / "scaler.json").read_text()))
    return state
