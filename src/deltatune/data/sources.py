"""Examples from built-in datasets or local files, as lists of dicts.

Local files go through the `datasets` library (extra `data`): JSONL (.jsonl/.json), CSV
(.csv/.tsv), Parquet (.parquet), a saved `datasets` directory (`save_to_disk`), or a text
folder with one sub-folder per class (`folder/<label>/*.txt` -> {"text", "label"}).
Nothing is downloaded."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import ConfigError, did_you_mean
from . import builtin
from ..extras import require
from .augment import augment

BUILTINS = {"sms_spam": (builtin.sms_spam, lambda: builtin.SMS_LABELS),
            "bbc_news": (builtin.bbc_news, builtin.bbc_labels),
            "bbc_titles": (builtin.bbc_titles, lambda: None)}
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


@dataclass
class DataConfig:
    source: str = field(default="", metadata={
        "help": "a built-in dataset (sms_spam, bbc_news, bbc_titles) or a local file/folder, split by test_fraction"})
    train: str = field(default="", metadata={"help": "a local training file/folder (instead of source)"})
    eval: str = field(default="", metadata={"help": "a local evaluation file/folder (with train)"})
    split: str = field(default="train", metadata={"help": "split of a saved DatasetDict used as source"})
    test_fraction: float = field(default=0.2, metadata={"help": "eval share when only source is given"})
    seed: int = field(default=0, metadata={"help": "seed of the train/eval split"})
    max_train: int = field(default=0, metadata={"help": "keep the first N training examples (0: all)"})
    max_eval: int = field(default=0, metadata={"help": "keep the first N evaluation examples (0: all)"})
    augment: list[str] = field(default_factory=list, metadata={
        "help": "counterfactual augmentations of the training set (e.g. gender_swap, or module:function)"})


def load_examples(cfg: DataConfig) -> tuple[list[dict], list[dict], list[str] | None]:
    """(train, eval, label names or None) for a data config."""
    names = None
    if cfg.source and (cfg.train or cfg.eval):
        raise ConfigError("data: give either source (split by test_fraction) or train/eval files, not both.")
    if cfg.source in BUILTINS:
        load, labels = BUILTINS[cfg.source]
        train, test = load(test_fraction=cfg.test_fraction, seed=cfg.seed)
        names = labels()
        names = list(names) if names is not None else None
    elif cfg.source:
        rows, names = read_local(cfg.source, cfg.split)
        train, test = builtin.split(rows, cfg.test_fraction, cfg.seed)
    elif cfg.train:
        train, names = read_local(cfg.train, cfg.split)
        test = read_local(cfg.eval, cfg.split)[0] if cfg.eval else []
    else:
        raise ConfigError(f"data names no examples: set source (one of {', '.join(BUILTINS)} or a path) "
                          "or train (and eval) files.")
    if cfg.max_train:
        train = train[:cfg.max_train]
    if cfg.max_eval:
        test = test[:cfg.max_eval]
    if cfg.augment:
        train = augment(train, cfg.augment)
    return train, test, names


def read_local(path: str, split: str = "train") -> tuple[list[dict], list[str] | None]:
    """Rows of a local file or folder, plus label names when the format gives them."""
    p = Path(path).expanduser()
    if not p.exists():
        known = did_you_mean(str(path), BUILTINS)
        raise ConfigError(f"No dataset at {str(path)!r}: not a file or folder, nor a built-in dataset.{known}")
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
            return _saved(p, split)
        return read_folder(p)
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise ConfigError(f"Cannot read {p.name}: supported files are {', '.join(FORMATS)}, a saved datasets "
                          "directory or a folder with one sub-folder of .txt files per class.")
    # Dataset.from_* read a local file only; load_dataset would also contact the hub (download counts)
    dataset = require("datasets", "data", f"Reading {p.suffix} files").Dataset
    if fmt == "csv":
        ds = dataset.from_csv(str(p), **({"delimiter": "\t"} if p.suffix.lower() == ".tsv" else {}))
    else:
        ds = getattr(dataset, f"from_{fmt}")(str(p))
    return ds.to_list(), _class_names(ds)


def _saved(p: Path, split: str):
    datasets = require("datasets", "data", "Reading a saved datasets directory")
    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ConfigError(f"{p} has splits {list(ds)}; set data.split to one of them.")
        ds = ds[split]
    return ds.to_list(), _class_names(ds)


def _class_names(ds):
    feature = ds.features.get("label") if hasattr(ds, "features") else None
    return list(feature.names) if hasattr(feature, "names") else None


def read_folder(root: Path) -> tuple[list[dict], list[str]]:
    """folder/<class>/*.txt -> {"text", "label"}, classes in sorted order."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    rows = [{"text": f.read_text(encoding="utf-8", errors="replace").strip(), "label": i}
            for i, c in enumerate(classes) for f in sorted((root / c).glob("*.txt"))]
    if not rows:
        raise ConfigError(f"{root} holds no <class>/*.txt files; a text folder has one sub-folder per class.")
    return rows, classes
