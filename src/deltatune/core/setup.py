"""The setup file: `deltatune_setup.json` next to the root delta that `save_pretrained`
writes, naming every saved delta's folder and the active composition, so that
`DeltaModel.from_pretrained(base, path, all_deltas=True)` restores them all, and facts about
the base model the deltas were trained on ("base"), so that loading onto another base model
is refused up front and `deltatune merge` can restore the label names."""
from __future__ import annotations

import json
from pathlib import Path

from .composition import Block
from .errors import CorruptFileError, IncompatibleDeltaError
from .heads import peft_task_type
from .io import atomic_write

SETUP_NAME = "deltatune_setup.json"  # next to the root delta's adapter_config.json (PEFT ignores it)
# config attribute names of the body facts, in the order they are looked up
_HIDDEN = ("hidden_size", "d_model", "n_embd")
_LAYERS = ("num_hidden_layers", "num_layers", "n_layer")
BODY_FACTS = ("model_type", "hidden_size", "num_hidden_layers")  # a delta fits a base with the same body


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
                       "active": setup_to_json(active), "base": base_facts(model.base_model)}, indent=2)
    atomic_write(Path(path) / SETUP_NAME, lambda t: Path(t).write_text(text))


def _load(file: Path) -> dict:
    try:
        setup = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CorruptFileError(f"{file} is not a deltatune setup file ({e}); re-save the model.") from None
    if not isinstance(setup, dict):
        raise CorruptFileError(f"{file} is not a deltatune setup file (not a JSON object); re-save the model.")
    return setup


def read_setup(path) -> tuple[dict[str, str], object]:
    """({delta name: folder relative to path}, the saved active setup)."""
    file = Path(path) / SETUP_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: all_deltas=True needs the {SETUP_NAME} that save_pretrained "
                                "writes next to the root delta. Load the deltas one by one with "
                                "load_delta(path_or_subfolder, name=...) instead.")
    setup = _load(file)
    try:
        deltas, active = dict(setup["deltas"]), setup_from_json(setup["active"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptFileError(f"{file} is not a deltatune setup file ({e}); re-save the model.") from None
    bad = [f for n, f in deltas.items() if f not in (".", n) or "/" in f or "\\" in f]
    if bad:
        raise CorruptFileError(f"{file} names delta folders {bad}; save_pretrained writes '.' or the delta's name.")
    return deltas, active


# -- the base model ------------------------------------------------------------------
def _first(config, names):
    return next((v for v in (getattr(config, n, None) for n in names) if v is not None), None)


def base_facts(model) -> dict:
    """What a delta needs of its base model, from the model's config: its name, architecture and
    body (model_type, hidden size, layer count, vocabulary) and, for a classifier, its label names."""
    config = getattr(model, "config", None)
    architectures = getattr(config, "architectures", None)
    facts = {"name_or_path": getattr(config, "_name_or_path", None) or None,
             "architecture": architectures[0] if architectures else type(model).__name__,
             "model_type": getattr(config, "model_type", None) or None,
             "hidden_size": _first(config, _HIDDEN), "num_hidden_layers": _first(config, _LAYERS),
             "vocab_size": getattr(config, "vocab_size", None)}
    if config is not None and peft_task_type(model) in ("SEQ_CLS", "TOKEN_CLS") and config.id2label:
        facts["id2label"] = {str(i): str(label) for i, label in config.id2label.items()}
        facts["label2id"] = {str(label): int(i) for label, i in config.label2id.items()}
    return facts


def _setup_file(path) -> Path | None:
    """The setup file describing the delta in `path`: its own, or its parent's when `path` is one
    of the subfolders save_pretrained wrote there."""
    path = Path(path)
    if (path / SETUP_NAME).is_file():
        return path / SETUP_NAME
    parent = path.parent / SETUP_NAME
    if parent.is_file():
        try:
            deltas = json.loads(parent.read_text()).get("deltas") or {}
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, AttributeError):
            return None  # not the setup of this delta's save
        if isinstance(deltas, dict) and path.name in deltas.values():
            return parent
    return None


def read_base(path) -> dict | None:
    """The base-model facts saved with the delta in `path`; None when there are none (a folder PEFT
    wrote, or a setup file from before they were recorded)."""
    file = _setup_file(path)
    if file is None:
        return None
    base = _load(file).get("base")
    if base is not None and not isinstance(base, dict):
        raise CorruptFileError(f"{file} has a 'base' that is not a JSON object; re-save the model.")
    return base


def describe_base(facts: dict) -> str:
    """'name (model_type, hidden H, N layers)', leaving out what is unknown."""
    body = [facts.get("model_type"),
            f"hidden {facts['hidden_size']}" if facts.get("hidden_size") is not None else None,
            f"{facts['num_hidden_layers']} layers" if facts.get("num_hidden_layers") is not None else None]
    body = ", ".join(str(b) for b in body if b)
    name = facts.get("name_or_path") or facts.get("architecture")
    return f"{name} ({body})" if body else str(name)


def check_base(recorded: dict, model, source) -> None:
    """Refuse a delta whose recorded base model has another body than `model` (the head may differ:
    BertModel and BertForSequenceClassification share their body)."""
    here = base_facts(model)
    if any(recorded.get(k) is not None and here[k] is not None and recorded[k] != here[k] for k in BODY_FACTS):
        raise IncompatibleDeltaError(f"Delta {str(source)!r} was trained on {describe_base(recorded)} but this base "
                                     f"model is {describe_base(here)}: load it onto the model it was trained for.")


def base_name(model) -> str:
    """The model's name or path (config._name_or_path), else its class name."""
    return getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__


def other_base_hint(source, recorded_name, model) -> str | None:
    """For a delta file that records only its base model's name (PEFT's base_model_name_or_path): a
    prefix for a loading error when that name is not this model's; None when they agree or it is unknown."""
    here = base_name(model)
    if not recorded_name or str(recorded_name).rstrip("/") == str(here).rstrip("/"):
        return None
    return (f"Delta {str(source)!r} was made for base model {str(recorded_name)!r} and this model is "
            f"{here!r}: ")
