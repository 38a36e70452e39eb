"""The setup file: `deltatune_setup.json` next to the root delta that `save_pretrained`
writes, naming every saved delta's folder and the active composition, so that
`DeltaModel.from_pretrained(base, path, all_deltas=True)` restores them all."""
from __future__ import annotations

import json
from pathlib import Path

from .composition import Block
from .errors import CorruptFileError
from .io import atomic_write

SETUP_NAME = "deltatune_setup.json"  # next to the root delta's adapter_config.json (PEFT ignores it)


def setup_to_json(active):
    """The JSON form of what `set_active` took: a list of names or a block's `to_dict()`."""
    return active.to_dict() if isinstance(active, Block) else list(active)


def setup_from_json(d):
    if isinstance(d, list) and all(isinstance(n, str) for n in d):
        return list(d)
    return Block.from_dict(d)


def write_setup(model, path, requested, saved: list[str], root: str) -> None:
    """Write `path`/deltatune_setup.json: which saved delta lives in which folder (in the order
    they were attached, so a fusion loads after its adapters) and the composition to activate:
    `requested` when it is a block, else the model's active setup when every delta it names was saved."""
    order = [n for n in model.configs if n in saved]
    if isinstance(requested, Block):
        active = requested
    elif set(model.active_names) <= set(saved) and model.active_names:
        active = model.active
    else:
        active = [root]
    text = json.dumps({"format": 1, "root": root, "deltas": {n: "." if n == root else n for n in order},
                       "active": setup_to_json(active)}, indent=2)
    atomic_write(Path(path) / SETUP_NAME, lambda t: Path(t).write_text(text))


def read_setup(path) -> tuple[dict[str, str], object]:
    """({delta name: folder relative to path}, the saved active setup)."""
    file = Path(path) / SETUP_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: all_deltas=True needs the {SETUP_NAME} that save_pretrained "
                                "writes next to the root delta. Load the deltas one by one with "
                                "load_delta(path_or_subfolder, name=...) instead.")
    try:
        setup = json.loads(file.read_text())
        deltas, active = dict(setup["deltas"]), setup_from_json(setup["active"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CorruptFileError(f"{file} is not a deltatune setup file ({e}); re-save the model.") from None
    bad = [f for n, f in deltas.items() if f not in (".", n) or "/" in f or "\\" in f]
    if bad:
        raise CorruptFileError(f"{file} names delta folders {bad}; save_pretrained writes '.' or the delta's name.")
    return deltas, active
