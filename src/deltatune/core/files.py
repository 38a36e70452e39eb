"""Delta files <-> a DeltaModel's pieces: ours and PEFT's adapter_config.json, and the
tensor keys `base_model.model.<module path>.<piece key>` (PEFT's layout; model-level
pieces use their own keys verbatim, prompt-learning task heads `base_model.<path>`)."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .config import DeltaConfig, PeftConvertible
from .copy import TrainableCopy
from .errors import ConfigError, IncompatibleDeltaError
from .heads import default_heads, peft_task_type
from .io import PREFIX, write_delta
from .pieces import MODEL_LEVEL
from .registry import config_from_dict, config_from_peft
from .targets import peft_layer

PEFT_PROMPT_ROOT = "base_model."  # PEFT keys prompt-learning deltas' task heads as base_model.<path>
# the heads PEFT's task wrappers add to modules_to_save (PeftModelForSequenceClassification etc.)
PEFT_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                   "QUESTION_ANS": ("qa_outputs",)}


# -- writing -------------------------------------------------------------------------
def delta_state(model, name: str) -> dict[str, torch.Tensor]:
    """The tensors of one delta under their file keys."""
    out, pieces = {}, model.pieces_of(name)
    root = getattr(pieces.get(MODEL_LEVEL), "file_key_root", PREFIX)
    for path, piece in pieces.items():
        prefix = "" if path == MODEL_LEVEL else root + path + "."
        for k, v in piece.file_state().items():
            out[prefix + k] = v
    return out


def file_config(model, name: str) -> dict:
    """adapter_config.json of one delta. Besides the method's options it records facts about the
    base model: PEFT's `task_type` (the auto class to load it with) and, in PEFT-style files,
    `modules_to_save` = the task heads this delta trained, so peft restores them too."""
    cfg = model.configs[name]
    d = cfg.to_peft_dict() if isinstance(cfg, PeftConvertible) else cfg.to_dict()
    if name in model.model_pieces:
        d = model.model_pieces[name].file_config(d)
    if d.get("task_type") is None:
        d["task_type"] = peft_task_type(model.base_model)
    if "peft_type" in d and d.get("modules_to_save") is None and cfg.modules_to_save is None:
        pieces = model.pieces_of(name)
        heads = [h for h in default_heads(model.base_model, cfg) if isinstance(pieces.get(h), TrainableCopy)]
        d["modules_to_save"] = heads or None
    if d.get("layers_to_transform") is not None:
        d = _peft_readable_layers(d, model.pieces_of(name))
    d.setdefault("base_model_name_or_path", getattr(model.base_model.config, "_name_or_path", None))
    return d


def _peft_readable_layers(d: dict, pieces: dict) -> dict:
    """PEFT refuses layers_to_transform beside a regex target_modules ("all-linear" included), and
    reads no layer index at the top of a bare model ("layers.0.self_attn.q_proj"): for such a layer
    selection the file names the targeted modules by full path instead, which PEFT takes as listed."""
    targets, pattern = d.get("target_modules"), d.get("layers_pattern")
    paths = [p for p, piece in pieces.items() if p != MODEL_LEVEL and not isinstance(piece, TrainableCopy)]
    listed = set(targets) if isinstance(targets, list) else set()
    if not isinstance(targets, str) and all(p in listed or peft_layer(p, pattern) is not None for p in paths):
        return d
    return {**d, "target_modules": paths, "layers_to_transform": None, "layers_pattern": None}


def write(model, path, names: list[str]) -> str:
    """Write each delta: the root one (the first, or "default") in `path`, others in `path/<name>/`.
    Returns the root's name."""
    root = "default" if "default" in names else names[0]
    for n in names:
        write_delta(Path(path) if n == root else Path(path) / n, file_config(model, n), delta_state(model, n))
    return root


# -- reading -------------------------------------------------------------------------
def config_from_file(d: dict, where: str = "adapter_config.json") -> DeltaConfig:
    """A config from adapter_config.json: ours (key "method") or PEFT's (key "peft_type"); a
    wrong value is a ConfigError naming `where` (the file)."""
    if "method" in d:
        d = {k: v for k, v in d.items() if k not in ("base_model_name_or_path", "task_type")}
        return config_from_dict(d, where=where)
    if "peft_type" in d:
        return config_from_peft(d, where=where)
    raise ConfigError(f"{where} names no method ('method' or PEFT's 'peft_type'); it is not a delta config.")


def split_key(key: str, pieces: dict) -> tuple[str | None, str]:
    """(module path of the piece a file key belongs to, the key inside that piece); path None
    when no piece of `pieces` owns the key."""
    for root in (PREFIX, PEFT_PROMPT_ROOT):  # ours/PEFT's, then PEFT's prompt-learning layout
        rest = key[len(root):] if key.startswith(root) else None
        best = None
        for path in pieces if rest is not None else ():
            if path and rest.startswith(path + ".") and (best is None or len(path) > len(best)):
                best = path
        if best is not None:
            return best, rest[len(best) + 1:]
    model_level = pieces.get(MODEL_LEVEL)
    if key.startswith(PEFT_PROMPT_ROOT) and (model_level is None or key not in model_level.file_state()):
        return None, key  # a model-level piece owns "base_model.*" keys only if it saves them (VeRA's A and B)
    return (MODEL_LEVEL, key) if MODEL_LEVEL in pieces else (None, key)


def by_piece(tensors: dict, pieces: dict) -> tuple[dict[str, dict], list[str]]:
    """File tensors grouped per piece ({path: {key in piece: tensor}}) and the keys no piece owns.
    PEFT also stores the untouched base weights of targeted embeddings (`.base_layer.`): skipped."""
    grouped, unowned = {path: {} for path in pieces}, []
    for key, value in tensors.items():
        if ".base_layer." in key:
            continue
        path, sub = split_key(key, pieces)
        if path is None:
            unowned.append(key)
        else:
            grouped[path][sub] = value
    return grouped, unowned


def load_tensors(model, name: str, tensors: dict, source, task_type: str | None = None) -> None:
    """Load a delta file's tensors into the pieces of the attached delta `name`, checking that the
    file has exactly the tensors (and shapes) these pieces hold. `task_type`: the file's (PEFT's),
    which says whether a task head left out of the file is an error."""
    pieces = model.pieces_of(name)
    grouped, unowned = by_piece(tensors, pieces)
    if unowned:
        raise IncompatibleDeltaError(
            f"Delta {str(source)!r} has weights for {unowned[0]!r}, which this {type(model.base_model).__name__} "
            "has no place for: the delta was made for another architecture or target set.")
    checked = []  # every piece is checked before any is loaded: a bad file changes nothing
    for path, piece in pieces.items():
        expected, got = piece.file_state(), grouped[path]
        if not got and _untrained_head(model, name, path, piece):
            _check_head_left_out(model, path, source, task_type)
            continue
        missing = sorted(set(expected) - set(got))
        if missing and not got:
            raise IncompatibleDeltaError(
                f"Delta {str(source)!r} has no weights for module {path or '(model level)'!r}, which its "
                "adapter_config.json selects here: the file was written for another target set, or its config "
                "has an option that left this module out and that deltatune does not read.")
        if missing:
            raise IncompatibleDeltaError(
                f"Delta {str(source)!r} lacks {missing} for module {path or '(model level)'!r}; "
                "the file is incomplete or belongs to another method.")
        for k, v in got.items():
            if k not in expected:
                raise IncompatibleDeltaError(f"Delta {str(source)!r} has unexpected weights {k!r} "
                                             f"for module {path!r}.")
            if not getattr(piece, "sparse_file", False) and tuple(expected[k].shape) != tuple(v.shape):
                raise IncompatibleDeltaError(
                    f"Delta {str(source)!r} does not fit this base model: module {path!r} weight {k!r} has "
                    f"shape {tuple(v.shape)} in the file but {tuple(expected[k].shape)} here "
                    "(the delta was trained on another base model).")
        checked.append((piece, got, next(iter(expected.values()), None)))
    for piece, got, ref in checked:
        piece.load_file_state({k: v.to(ref.device if ref is not None else "cpu") for k, v in got.items()})


def _untrained_head(model, name: str, path: str, piece) -> bool:
    """A default task head (modules_to_save left None) that a file has no weights for."""
    return (isinstance(piece, TrainableCopy) and model.configs[name].modules_to_save is None
            and path in default_heads(model.base_model, model.configs[name]))


def _check_head_left_out(model, path: str, source, task: str | None) -> None:
    """A file without its task head. PEFT's wrapper for the file's task_type (SEQ_CLS, TOKEN_CLS,
    QUESTION_ANS) adds the head to modules_to_save and fails to find its weights; with no such
    task_type PEFT uses the base model's head as it is. We refuse the first, saying why, and load
    the second with a warning (the head may be a random new one)."""
    model_name = type(model.base_model).__name__
    if path in PEFT_TASK_HEADS.get(task, ()):
        raise IncompatibleDeltaError(
            f"Delta {str(source)!r} has no weights for the task head {path!r} (saved without modules_to_save); "
            f"the head would be random: its task_type {task!r} says the head is trained and saved with the delta "
            f"(peft restores {path!r} from the file, and fails on this one), but the file leaves it out, and "
            f"this {model_name}'s own head is a new, random one unless you loaded a trained head. Fix: save the "
            f"delta again from the model it was trained with, with modules_to_save=[{path!r}]; or, if this base "
            "model's head is the trained one, set \"task_type\": null in adapter_config.json to use it as it is.")
    warnings.warn(
        f"Delta {str(source)!r} has no weights for the task head {path!r} (saved without modules_to_save): as "
        f"peft does for a file with task_type {task!r}, the head is used as this {model_name} has it, which is "
        "random if the model was created with a new head. To keep a trained head, save the delta with "
        f"modules_to_save=[{path!r}] (peft: LoraConfig(task_type='SEQ_CLS') or modules_to_save=[{path!r}]), "
        "or load it onto a base model whose head is trained.", stacklevel=4)
