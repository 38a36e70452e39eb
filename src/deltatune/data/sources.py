"""Examples from built-in datasets or local files, as train / validation / test lists of dicts.

Local files go through the `datasets` library (extra `data`): JSONL (.jsonl/.json), CSV
(.csv/.tsv), Parquet (.parquet), a saved `datasets` directory (`save_to_disk`), or a text
folder with one sub-folder per class (`folder/<label>/*.txt` -> {"text", "label"}).
Nothing is downloaded, and input files are only ever read. A file that cannot be read is a
ConfigError naming the file (and line where known), never a parser's traceback."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..core.errors import ConfigError, did_you_mean
from . import builtin
from ..extras import require
from .augment import augment

BUILTINS = {"sms_spam": (builtin.sms_spam, lambda: builtin.SMS_LABELS),
            "bbc_news": (builtin.bbc_news, builtin.bbc_labels),
            "bbc_titles": (builtin.bbc_titles, lambda: None)}
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


class Splits(NamedTuple):
    """The examples of a run, split by purpose."""
    train: list[dict]
    validation: list[dict]    # picks the best checkpoint / stops early; may be []
    test: list[dict]          # reported after training only; may be []
    labels: list[str] | None  # label names the source format gives (ClassLabel, folder names, builtin)
    sources: dict[str, str]   # split name -> where its rows came from, for error messages


@dataclass
class DataConfig:
    source: str = field(default="", metadata={
        "help": "a built-in dataset (sms_spam, bbc_news, bbc_titles) or a local file/folder, split by test_fraction"})
    train: str = field(default="", metadata={"help": "a local training file/folder (instead of source)"})
    eval: str = field(default="", metadata={
        "help": "a local test file/folder (with train): reported after training, never used to pick checkpoints"})
    validation: str = field(default="", metadata={
        "help": "a local validation file/folder for model selection (best checkpoint, early stopping); "
                "default: validation_fraction of the training rows"})
    split: str = field(default="train", metadata={"help": "split of a saved DatasetDict used as source"})
    test_fraction: float = field(default=0.2, metadata={"help": "test share of source (not used with train files)"})
    validation_fraction: float = field(default=0.1, metadata={
        "help": "share of the training rows held out for validation when no validation file is given (0: none)"})
    seed: int = field(default=0, metadata={"help": "seed of the test and validation splits"})
    max_train: int = field(default=0, metadata={"help": "keep the first N training examples (0: all)"})
    max_eval: int = field(default=0, metadata={"help": "keep the first N validation and test examples (0: all)"})
    augment: list[str] = field(default_factory=list, metadata={
        "help": "counterfactual augmentations of the training set (e.g. gender_swap, or module:function)"})

    def __post_init__(self):
        self.check()

    def check(self):
        """ConfigError for values out of range or files given in a combination that has no meaning."""
        for name in ("test_fraction", "validation_fraction"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ConfigError(f"data.{name} must be in [0, 1), got {value}.")
        for name in ("max_train", "max_eval"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name} must be 0 (all) or a positive count, got {getattr(self, name)}.")
        if self.source and (self.train or self.eval):
            raise ConfigError("data: give either source (split by test_fraction) or train/eval files, not both.")
        if self.source and not self.validation and self.test_fraction + self.validation_fraction >= 1:
            raise ConfigError(f"data.test_fraction + data.validation_fraction must be below 1, got "
                              f"{self.test_fraction} + {self.validation_fraction}; no training rows would be left.")


def load_examples(cfg: DataConfig) -> Splits:
    """The train, validation and test examples of a data config, with the source's label names.
    Validation is the validation file, else validation_fraction of the training rows (seeded)."""
    cfg.check()
    train, test, names, where = _train_and_test(cfg)
    train, validation, where_validation = _validation(cfg, train, names, where["train"])
    if validation and not cfg.validation:
        where["train"] += f" less the {cfg.validation_fraction * 100:g}% held out for validation"
    sources = {"train": where["train"], "validation": where_validation, "test": where["test"]}
    if not train:
        raise ConfigError(f"{sources['train']}: no training rows are left after holding out the test and "
                          "validation rows; add examples, or lower data.test_fraction / data.validation_fraction.")
    if cfg.max_train:
        train = train[:cfg.max_train]
    if cfg.max_eval:
        validation, test = validation[:cfg.max_eval], test[:cfg.max_eval]
    if cfg.augment:
        train = augment(train, cfg.augment)
    return Splits(train, validation, test, names, sources)


def _share(fraction: float, of: str, seed: int) -> str:
    return f"{fraction * 100:g}% of {of} (seed {seed})"


def _train_and_test(cfg: DataConfig):
    """(train, test, label names, {split: where it came from}) from source (split by test_fraction)
    or train/eval files."""
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
        test = _read_more(cfg.eval, cfg.split, names, cfg.train) if cfg.eval else []
        return train, test, names, {"train": cfg.train, "test": cfg.eval or "none (no data.eval file)"}
    else:
        raise ConfigError(f"data names no examples: set source (one of {', '.join(BUILTINS)} or a path) "
                          "or train (and eval) files.")
    return train, test, names, {"train": f"{cfg.source} (training part, seed {cfg.seed})",
                                "test": _share(cfg.test_fraction, cfg.source, cfg.seed)}


def _validation(cfg: DataConfig, train: list[dict], names, train_where: str):
    """(train, validation, where validation came from): the validation file, else a seeded share
    carved off the training rows (both parts keep their order, so rows stay easy to find)."""
    if cfg.validation:
        return train, _read_more(cfg.validation, cfg.split, names, train_where), cfg.validation
    if not cfg.validation_fraction:
        return train, [], "none (data.validation_fraction is 0)"
    rest, validation = carve(train, cfg.validation_fraction, cfg.seed)
    if not validation:
        return train, [], f"none ({cfg.validation_fraction * 100:g}% of {len(train)} training rows is under one row)"
    of = cfg.train or f"the training part of {cfg.source}"
    return rest, validation, _share(cfg.validation_fraction, of, cfg.seed)


def carve(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(rest, held out): the rows `builtin.split` would hold out, both parts in their original order."""
    rest, held = builtin.split(range(len(rows)), fraction, seed)
    return [rows[i] for i in sorted(rest)], [rows[i] for i in sorted(held)]


def _read_more(path: str, split: str, train_names, train_where: str) -> list[dict]:
    """Rows of a validation or test file, whose label names (if any) must be the training file's."""
    rows, names = read_local(path, split)
    if names is not None and train_names is not None and list(names) != list(train_names):
        raise ConfigError(f"{path}: its label names {list(names)} differ from those of {train_names} "
                          f"({train_where}); label ids would mean different classes. Use the same label feature.")
    return rows


# ---- reading local files ------------------------------------------------------------------------
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
    if p.stat().st_size == 0:
        raise ConfigError(f"{path}: the file is empty (0 bytes); write the examples into it or point data at "
                          "another file.")
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot be opened ({e.strerror}); check that it is readable.") from e
    if fmt == "csv":
        check_csv(p, str(path))
    ds = _read_file(p, fmt, str(path))
    if len(ds) == 0:
        raise ConfigError(f"{path}: the file holds no rows; write the examples into it.")
    try:
        return ds.to_list(), _class_names(ds)
    except UnicodeDecodeError as e:  # a string the parser passed through undecoded
        raise ConfigError(f"{path}: is not UTF-8 text ({e}); save it as UTF-8.") from None


def _read_file(p: Path, fmt: str, where: str):
    """A `datasets.Dataset` of one local file; its parser's errors become a ConfigError."""
    # Dataset.from_* read a local file only; load_dataset would also contact the hub (download counts)
    dataset = require("datasets", "data", f"Reading {p.suffix} files").Dataset
    try:
        if fmt == "csv":
            return dataset.from_csv(str(p), **({"delimiter": "\t"} if p.suffix.lower() == ".tsv" else {}))
        return getattr(dataset, f"from_{fmt}")(str(p))
    except Exception as e:  # the parsers raise many types; each becomes one message naming the file
        problem = (json_problem(p) if fmt == "json" else None) or f"cannot be read as {NAMES[fmt]}"
        raise ConfigError(f"{where}: {problem} ({_root_cause(e)}); {FIXES[fmt]}") from e


NAMES = {"json": "JSON", "csv": "CSV", "parquet": "Parquet"}
FIXES = {"json": "write one JSON object per line (JSONL) or one JSON list of objects",
         "csv": "write a header line and then one line per example, quoting fields that contain the delimiter",
         "parquet": "write it with pandas.DataFrame.to_parquet or datasets.Dataset.to_parquet"}


def _root_cause(e: BaseException) -> str:
    """The first error under `datasets`' generic wrapper, as 'Type: first line of message'."""
    while type(e).__name__ == "DatasetGenerationError" and (e.__cause__ or e.__context__):
        e = e.__cause__ or e.__context__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def check_csv(p: Path, where: str):
    """ConfigError when a CSV/TSV file is not UTF-8 text, has a header but no rows, or has a row
    whose number of fields differs from the header's (pandas would fill missing fields silently)."""
    delimiter = "\t" if p.suffix.lower() == ".tsv" else ","
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter)
            rows = (r for r in reader if len(r) > 1 or "".join(r).strip())  # pandas skips blank lines
            header = next(rows, None)
            n = 0
            for n, row in enumerate(rows, 1):
                if len(row) != len(header):
                    fields = f"{len(row)} field{'s' * (len(row) != 1)}"
                    raise ConfigError(f"{where}: line {reader.line_num} has {fields} but the header has {len(header)} "
                                      f"({header}); quote fields that contain {delimiter!r} or fix the line.")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: is not UTF-8 text, perhaps a binary file (byte {e.start}: {e.reason}); "
                          "save it as UTF-8 CSV.") from e
    except csv.Error:
        return  # e.g. a field over the csv module's size limit: leave the verdict to pandas
    if header is None:
        raise ConfigError(f"{where}: the file holds only blank lines; write a header line and one line per "
                          "example.")
    if n == 0:
        raise ConfigError(f"{where}: the file has a header {header} but no rows; add one line per example.")


def json_problem(p: Path) -> str | None:
    """Why a JSON/JSONL file does not parse, with its line number, or None if it does."""
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        return f"is not UTF-8 text, perhaps a binary file (byte {e.start}: {e.reason})"
    if not text.strip():
        return "holds no rows (only blank lines)"
    try:
        json.loads(text)
        return None
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            return f"line {e.lineno} is not valid JSON ({e.msg})"
    for number, line in enumerate(text.splitlines(), 1):
        try:
            if line.strip():
                json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {number} is not valid JSON ({e.msg}: {line.strip()[:60]!r})"
    return None


def _saved(p: Path, split: str):
    datasets = require("datasets", "data", "Reading a saved datasets directory")
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # a damaged save: name the folder instead of showing pyarrow's traceback
        raise ConfigError(f"{p}: cannot be loaded as a saved datasets directory ({_root_cause(e)}); save it "
                          "again with Dataset.save_to_disk.") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ConfigError(f"{p} has splits {list(ds)}; set data.split to one of them.")
        ds = ds[split]
    if len(ds) == 0:
        raise ConfigError(f"{p}: the saved dataset (split {split!r}) holds no rows.")
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
