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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .core.errors import ConfigError, did_you_mean
from .core.registry import config_from_dict
from .recipes import get_recipe
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
        try:
            return config_from_dict(dict(self.delta))
        except ConfigError as e:
            raise ConfigError(f"delta: {e}") from None

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


# ---- generic strict dataclass parsing -----------------------------------------------------------
def build(cls, raw, where: str):
    """`cls(**raw)` recursively, where unknown keys are errors naming the nearest valid key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping of options, got {raw!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            near = did_you_mean(key, names)
            raise ConfigError(f"Unknown key {path!r}.{near} Valid keys{' of ' + where if where else ''}: "
                              f"{', '.join(names)}.")
        kwargs[key] = _value(hints[key], value, path)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None


def _value(tp, value, path):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list of mappings.")
        return [build(args[0], v, f"{path}.{i}") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)  # YAML reads 1e-4 (no dot) as a string
        except ValueError:
            raise ConfigError(f"{path} must be a number, got {value!r}.") from None
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, float, str, bool) and value is not None and not isinstance(value, tp):
        if not (tp is float and isinstance(value, int)):
            raise ConfigError(f"{path} must be {tp.__name__}, got {value!r}.")
    if origin is list and isinstance(value, str):
        return [value]
    return value


# ---- overrides ------------------------------------------------------------------------------------
def apply_override(raw: dict, assignment: str) -> None:
    """`a.b.c=value` into the nested dict (list items by index); value parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"Override {assignment!r} is not key=value (e.g. train.lr=1e-4).")
    key, _, text = assignment.partition("=")
    value = yaml.safe_load(text) if text.strip() else ""
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


# ---- the run config -------------------------------------------------------------------------------
def load_run_config(path=None, overrides=(), raw: dict | None = None) -> RunConfig:
    """Read a run YAML (or a dict), apply overrides, validate everything."""
    if raw is None:
        text = Path(path).read_text()
        raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a run config is a mapping (output_dir, model, delta, data, task, train, recipe).")
    raw = _copy(raw)
    for o in overrides:
        apply_override(raw, o)
    return parse_run_config(raw)


def _copy(x):
    return yaml.safe_load(yaml.safe_dump(x))


def parse_run_config(raw: dict) -> RunConfig:
    raw = dict(raw)
    recipe = raw.pop("recipe", "task")
    recipe = {"name": recipe} if isinstance(recipe, str) else dict(recipe or {})
    name = recipe.pop("name", "task")
    train = dict(raw.pop("train", None) or {})
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


