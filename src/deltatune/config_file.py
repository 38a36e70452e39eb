"""One YAML file -> the same dataclass configs as the Python API.

    output_dir: outputs/sms-lora          # required; override with output_dir=...
    model: {path: minilm}                 # minilm | smollm2 | a local HF folder; tiny: true for a small random one
    delta: {method: lora, r: 8}           # any registered method (dt.config_from_dict)
    data: {source: sms_spam, max_train: 1500}          # DataConfig
    task: {type: classification, max_length: 64}       # TaskConfig
    train: {epochs: 1, lr: 1.0e-3}                     # TrainConfig
    recipe: task                          # or {name: adaptive, ...the recipe's options}

Unknown keys are errors that name the nearest valid key; `key=value` overrides use dotted
keys (`train.lr=1e-4`, `recipe.tasks.0.data.max_train=100`), values parsed as YAML."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .core.typed import build
from .core.errors import ConfigError
from .core.registry import config_from_dict
from .recipes import get_recipe
from .data.models import resolve_path
from .data.sources import DataConfig
from .data.tasks import TaskConfig
from .train.config import TrainConfig


@dataclass
class ModelConfig:
    path: str = field(default="", metadata={"help": "minilm | smollm2 | a local Hugging Face model folder"})
    tiny: Any = field(default=False, metadata={
        "help": "true (or a dict of config sizes): a small random model of the same architecture, real tokenizer"})


@dataclass
class RunConfig:
    output_dir: str = field(default="", metadata={"help": "where deltas, metrics and the resolved config go"})
    model: ModelConfig = field(default_factory=ModelConfig)
    delta: dict = field(default_factory=dict, metadata={"help": "the delta's config, with its 'method' key"})
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recipe: str = field(default="task", metadata={"help": "the recipe's name"})
    recipe_options: Any = None  # the recipe's own options dataclass (from the `recipe` mapping)

    def delta_config(self):
        delta = dict(self.delta)
        if delta.get("init") in ("text", "labels") and not {"tokenizer", "init_token_ids"} & set(delta) \
                and self.model.path:  # a prompt started from words reads them with the run's own tokenizer
            delta["tokenizer"] = str(resolve_path(self.model.path, weights=False))
        return config_from_dict(delta, where="delta")

    def to_dict(self) -> dict:
        d = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "recipe_options"}
        d["recipe"] = {"name": self.recipe, **(_plain(self.recipe_options) or {})}
        d["train"].pop("output_dir", None)
        return d


def _plain(v):
    if dataclasses.is_dataclass(v):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


# ---- overrides ------------------------------------------------------------------------------------
def apply_override(raw: dict, assignment: str) -> None:
    """`a.b.c=value` into the nested dict (list items by index); value parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"Override {assignment!r} is not key=value (e.g. train.lr=1e-4).")
    key, _, text = assignment.partition("=")
    value = _parse_yaml(text, f"Override {assignment!r}") if text.strip() else ""
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_index(part, node, parts[:i])]
            continue
        if part == "recipe" and isinstance(node.get("recipe"), str):
            node["recipe"] = {"name": node["recipe"]}
        node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"Override {key!r}: {'.'.join(parts[:i + 1])} is a value, not a mapping.")
    last = parts[-1]
    if isinstance(node, list):
        node[_index(last, node, parts[:-1])] = value
    elif last == "recipe" and isinstance(node.get("recipe"), dict) and isinstance(value, str):
        node["recipe"]["name"] = value
    else:
        node[last] = value


def _index(part, node, before):
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{'.'.join(before)} is a list of {len(node)}; index it with 0..{len(node) - 1}.")
    return int(part)


# ---- reading YAML ---------------------------------------------------------------------------------
def read_yaml(path):
    """The YAML document in the file `path`; a missing, unreadable, non-UTF-8 or malformed file is a
    ConfigError naming the file (and the line and column of a syntax error)."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; check the config file's path.") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder; pass the YAML config file inside it.") from None
    except OSError as e:
        raise ConfigError(f"{path} cannot be read ({e.strerror or e}); check the file and its permissions.") from None
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}, line {line}: byte {e.object[e.start]:#04x} is not UTF-8 text; save the file "
                          "as UTF-8.") from None
    return _parse_yaml(text, str(path))


def _parse_yaml(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = e.problem or e.context or "unreadable YAML"
        raise ConfigError(f"{where}{at}: {problem} — fix the YAML syntax.") from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (control characters, ...)
        line = text[:e.position].count("\n") + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        raise ConfigError(f"{where}, line {line}, column {column}: unacceptable character #x{e.character:04x} "
                          "— remove it (YAML allows printable text only).") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: {str(e).splitlines()[0]} — fix the YAML syntax.") from None
    except (ValueError, TypeError, OverflowError) as e:  # e.g. a date YAML recognises but cannot build
        raise ConfigError(f"{where}: a YAML value cannot be read ({e}); quote it to make it a string.") from None
    except RecursionError:
        raise ConfigError(f"{where}: the YAML is nested too deeply.") from None


# ---- the run config -------------------------------------------------------------------------------
RUN_KEYS = "output_dir, model, delta, data, task, train, recipe"


def load_run_config(path=None, overrides=(), raw: dict | None = None) -> RunConfig:
    """Read a run YAML (or a dict), apply overrides, validate everything."""
    where = str(path) if raw is None else "the run config"
    if raw is None:
        raw = read_yaml(path)
        if raw is None:
            raise ConfigError(f"{path} is empty: a run config is a mapping ({RUN_KEYS}); "
                              "see examples/task_lora_sms.yaml.")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a run config is a mapping ({RUN_KEYS}), got a {type(raw).__name__}.")
    raw = _copy(raw)
    for o in overrides:
        apply_override(raw, o)
    return parse_run_config(raw)


def _copy(x):
    return yaml.safe_load(yaml.safe_dump(x))


def parse_run_config(raw: dict) -> RunConfig:
    raw = dict(raw)
    recipe = raw.pop("recipe", "task")
    if not isinstance(recipe, (str, dict, type(None))):
        raise ConfigError(f"recipe must be a recipe's name or a mapping with its name and options, got {recipe!r:.60}.")
    recipe = {"name": recipe} if isinstance(recipe, str) else dict(recipe or {})
    name = recipe.pop("name", "task")
    if not isinstance(name, str):
        raise ConfigError(f"recipe.name must be a recipe's name (a string), got {name!r:.60}.")
    train = raw.pop("train", None)
    if not isinstance(train, (dict, type(None))):
        raise ConfigError(f"train must be a mapping of training options, got {train!r:.60}.")
    train = dict(train or {})
    if "output_dir" in train:
        raise ConfigError("output_dir is a top-level key of a run config (not train.output_dir).")
    cfg = build(RunConfig, raw, "")
    if not cfg.output_dir:
        raise ConfigError("The run config needs output_dir (where deltas and metrics go); add output_dir: DIR "
                          "or pass output_dir=DIR.")
    if not cfg.model.path:
        raise ConfigError("model.path is missing: minilm, smollm2 or a local model folder.")
    if not cfg.delta:
        raise ConfigError("delta is missing: e.g. delta: {method: lora, r: 8, alpha: 16, targets: all-linear}.")
    cfg.delta_config()  # validates the delta now
    cfg.train = build(TrainConfig, {**train, "output_dir": cfg.output_dir}, "train")
    spec = get_recipe(name)
    cfg.recipe, cfg.recipe_options = spec.name, build(spec.options, recipe, "recipe")
    return cfg


