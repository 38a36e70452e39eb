"""`deltatune merge`: fold a delta into its base model and write a complete Hugging Face model
folder (weights, config.json with the label names, tokenizer, generation config) that the Auto
classes load on their own. The folder appears whole or not at all: it is built in a temporary
sibling folder and renamed into place."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from .core.errors import ConfigError
from .core.io import read_delta
from .core.model import DeltaModel
from .core.setup import read_base
from .data.models import load_model, resolve_path

# any of these in a model folder means it ships a tokenizer (AutoTokenizer "loads" an empty one otherwise)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model")
GENERATION_CONFIG = "generation_config.json"
AUTO_CLASSES = {"SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
                "CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
                "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}


@dataclass
class MergeResult:
    """What `merge_to_folder` wrote: the folder, the model class, its files, and what is missing."""
    path: Path
    architecture: str
    files: list[str]
    tokenizer: bool
    warnings: list[str] = field(default_factory=list)


def merge_to_folder(base, delta_dir, output_dir, overwrite: bool = False) -> MergeResult:
    """Load `base` (a folder or a built-in name: "minilm", "smollm2") with the auto class the delta
    was trained with, fold the delta in `delta_dir` into it and write the plain model to `output_dir`.
    A non-empty `output_dir` is refused unless `overwrite`; one inside (or holding) the delta or
    base folder always is. Checked before anything heavy is loaded."""
    out, delta_dir = Path(output_dir).expanduser().resolve(), Path(delta_dir).expanduser().resolve()
    _refuse_nesting(out, delta_dir, "delta folder")
    base_dir = resolve_path(base, weights=False).resolve()  # the folder only: weights are converted below
    _refuse_nesting(out, base_dir, "base model folder")
    check_output_folder(out, overwrite)
    plain = merged_model(base, delta_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        plain.save_pretrained(tmp)  # safetensors, config.json (labels), the model's generation config
        no_tokenizer = _save_tokenizer(base_dir, tmp)
        _save_generation_config(base_dir, tmp)
        files = sorted(p.name for p in tmp.iterdir())
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return MergeResult(out, type(plain).__name__, files, tokenizer=no_tokenizer is None,
                       warnings=[no_tokenizer] if no_tokenizer else [])


def merged_model(base, delta_dir):
    """The base model, loaded as the delta's file says, with the delta folded in; refused when the
    result could not be loaded back as its own architecture."""
    config, tensors = read_delta(delta_dir)
    auto_class, kwargs = auto_class_for(config, tensors, read_base(delta_dir))
    model = DeltaModel.from_pretrained(load_model(str(resolve_path(base)), auto_class, **kwargs), delta_dir)
    plain = model.merge_and_unload()
    check_reloadable(plain)
    return plain


def _refuse_nesting(out: Path, other: Path, what: str) -> None:
    if out == other or other in out.parents:
        raise ConfigError(f"Output folder {out} is inside the {what} {other}: write the merged model to a "
                          "folder outside it.")
    if out in other.parents:
        raise ConfigError(f"Output folder {out} holds the {what} {other}, which replacing it would delete: "
                          "choose another folder.")


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder unless `overwrite`."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"Output {out} is a file: choose a new folder for the merged model.")
    held = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise ConfigError(f"Output folder {out} is not empty (it holds {shown}); choose a new folder or pass "
                          "--overwrite.")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to `out`; an existing `out` is moved aside first and deleted after."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.{os.getpid()}.old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _save_tokenizer(base_dir: Path, out: Path) -> str | None:
    """Copy the base folder's tokenizer into `out`; a warning when there is none to copy."""
    if not any((base_dir / f).is_file() for f in TOKENIZER_FILES):
        return (f"the base model folder {base_dir} has no tokenizer, so the merged folder has none: copy the "
                "base model's tokenizer into it (AutoTokenizer.from_pretrained(...).save_pretrained(folder)).")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        return (f"the tokenizer of {base_dir} does not load ({str(e).splitlines()[0]}), so the merged folder has "
                "no tokenizer: copy a working one into it.")
    tokenizer.save_pretrained(out)
    return None


def _save_generation_config(base_dir: Path, out: Path) -> None:
    """The base's generation_config.json, when the model's save did not write one."""
    if (base_dir / GENERATION_CONFIG).is_file() and not (out / GENERATION_CONFIG).is_file():
        shutil.copyfile(base_dir / GENERATION_CONFIG, out / GENERATION_CONFIG)


def check_reloadable(plain) -> None:
    """A merged model must load back as its own architecture: refuse weights its config has no place for."""
    with torch.device("meta"):
        expected = set(type(plain)(plain.config).state_dict())
    extra = sorted(set(plain.state_dict()) - expected)
    if extra:
        raise ConfigError(f"The merged model has weights its architecture does not have ({', '.join(extra[:3])}"
                          f"{', ...' if len(extra) > 3 else ''}): e.g. BitFit's add_missing biases. transformers "
                          "would drop them on loading, so keep this delta unmerged (load it with the base model).")


def auto_class_for(config: dict, tensors: dict, base: dict | None = None):
    """The auto class the delta's base model was loaded with (the file's task_type) and, for a
    classifier, its number of labels (the saved head's output size) and their names (the base
    facts saved with the delta, when they agree with the head)."""
    task = config.get("task_type") or "FEATURE_EXTRACTION"
    kwargs = {}
    if task in ("SEQ_CLS", "TOKEN_CLS"):
        heads = [v for k, v in tensors.items() if k.endswith(("classifier.weight", "score.weight"))]
        if heads:
            kwargs["num_labels"] = heads[0].shape[0]
        id2label = (base or {}).get("id2label")
        if id2label and len(id2label) == kwargs.get("num_labels", len(id2label)):
            kwargs["id2label"] = {int(i): label for i, label in id2label.items()}
            kwargs["label2id"] = {label: i for i, label in kwargs["id2label"].items()}
            kwargs["num_labels"] = len(id2label)
    return getattr(transformers, AUTO_CLASSES.get(task, "AutoModel")), kwargs
