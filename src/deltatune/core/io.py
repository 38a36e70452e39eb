"""The delta file format: `adapter_config.json` + `adapter_model.safetensors`.

Tensor keys are `base_model.model.<module path>.<piece key>` (PEFT's layout),
and model-level pieces (soft prompts) use their own keys verbatim. Writes are
atomic (temporary file, then rename). Pickle files are refused."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CorruptFileError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_PICKLES = ("adapter_model.bin", "pytorch_model.bin", ".pt", ".pth", ".ckpt", ".pkl")


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over `path`, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def untied(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, one storage per key: safetensors refuses shared storage,
    which tied weights (embeddings and LM head in a full delta) have."""
    seen, out = set(), {}
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        out[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    return out


def write_delta(directory, config_dict: dict, tensors: dict[str, torch.Tensor]) -> None:
    directory = Path(directory)
    tensors = untied(tensors)
    atomic_write(directory / WEIGHTS_NAME, lambda t: save_file(tensors, t, metadata={"format": "pt"}))
    text = json.dumps(config_dict, indent=2, sort_keys=True)
    atomic_write(directory / CONFIG_NAME, lambda t: Path(t).write_text(text))


def read_delta(directory) -> tuple[dict, dict[str, torch.Tensor]]:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"No delta directory at {str(directory)!r}.")
    cfg_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not weights.exists():
        pickles = [p.name for p in directory.iterdir() if p.name.endswith(_PICKLES)]
        if pickles:
            raise CorruptFileError(
                f"{directory} holds only pickle weights ({', '.join(pickles)}); deltatune never unpickles "
                "files. Convert them to safetensors in a trusted environment "
                "(safetensors.torch.save_file) and load again.")
        raise FileNotFoundError(f"{weights} not found: a delta directory holds {CONFIG_NAME} and {WEIGHTS_NAME}.")
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: a delta directory holds {CONFIG_NAME} and {WEIGHTS_NAME}.")
    config = read_json(cfg_path, "the delta")
    if not isinstance(config, dict):
        raise CorruptFileError(f"{cfg_path} holds a JSON {type(config).__name__}, not the mapping of a delta's "
                               "options; re-save the delta.")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as e:
        raise CorruptFileError(f"{weights} is not a readable safetensors file ({e}); "
                               "the file is truncated or corrupt: re-save or re-download it.") from None
    return config, tensors


def read_json(path: Path, what: str):
    """The JSON value in `path`; a file that is not UTF-8 JSON is a CorruptFileError (re-save `what`)."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"{path} is not valid JSON (byte {e.start} is not UTF-8 text); "
                               f"re-save {what}.") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e}); re-save {what}.") from None
    except OSError as e:
        raise CorruptFileError(f"{path} cannot be read ({e.strerror or e}); re-save {what}.") from None
