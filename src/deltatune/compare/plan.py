"""A comparison's config: the run config every method shares (model, data, task, train, recipe, as
`deltatune train` reads it), the methods (a delta each, with optional changes to the training options
and an optional learning-rate sweep) and the seeds.

    output_dir: outputs/compare-sms
    model: {path: minilm}
    data: {source: sms_spam, max_train: 1500}        # one fixed split (data.seed) for every run
    task: {type: classification, max_length: 64}
    train: {epochs: 1, batch_size: 32}
    seeds: [0, 1, 2]                                 # train.seed of each run: initialisation, order, dropout
    methods:
      lora: {method: lora, r: 8}                     # shorthand: the delta itself
      bitfit:
        delta: {method: bitfit}
        train: {lr: 1.0e-2}                          # changes to the shared train options
        lrs: [1.0e-3, 1.0e-2]                        # sweep, chosen on the validation split
    isolate: true                                    # each run in its own process (measures its peak memory)
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

from ..config_file import apply_override, load_run_config, read_yaml
from ..core.errors import ConfigError, UnknownMethodError
from ..recipes.common import for_task

NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
OWN_KEYS = ("seeds", "methods", "isolate")
METHOD_KEYS = ("delta", "train", "lrs")


@dataclass
class MethodSpec:
    name: str
    delta: dict
    train: dict  # changes to the shared train options
    lrs: list  # learning rates to sweep (empty: the run's own lr)
    default_lr: float | None = None  # the delta's recommended rate, written into runs that set none


@dataclass
class Comparison:
    output_dir: Path
    shared: dict  # the run config every method shares, without output_dir and delta
    methods: list
    seeds: list
    isolate: bool
    metric: str
    greater_is_better: bool

    def run_config(self, method: MethodSpec, seed: int, lr: float | None, folder: Path) -> dict:
        """The whole run config (as `deltatune train` reads it) of one run."""
        raw = copy.deepcopy(self.shared)
        raw["output_dir"] = str(folder)
        raw["delta"] = copy.deepcopy(method.delta)
        train = {**(raw.get("train") or {}), **method.train, "seed": seed}
        if lr is not None:
            train["lr"] = lr
        elif train.get("lr") is None and method.default_lr is not None:
            train["lr"] = method.default_lr  # so that the run's cache key holds the rate it trains at
        raw["train"] = train
        return raw


def load_comparison(path=None, overrides=(), raw: dict | None = None) -> Comparison:
    """Read and check a comparison YAML (or dict): every method's run config is validated now, so that
    a typo in the last method fails before the first run starts."""
    where = str(path) if raw is None else "the comparison config"
    raw = read_yaml(path) if raw is None else copy.deepcopy(raw)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a comparison config is a mapping (output_dir, model, data, task, train, "
                          f"seeds, methods), got {type(raw).__name__}.")
    for o in overrides:
        apply_override(raw, o)
    seeds = raw.pop("seeds", [0])
    methods = raw.pop("methods", None)
    isolate = raw.pop("isolate", True)
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                            for s in seeds):
        raise ConfigError(f"seeds must be a non-empty list of integers (e.g. [0, 1, 2]), got {seeds!r:.60}.")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds repeat a value ({seeds}); give each run its own seed.")
    if not isinstance(isolate, bool):
        raise ConfigError(f"isolate must be true or false, got {isolate!r:.60}.")
    if not isinstance(methods, dict) or not methods:
        raise ConfigError("methods is missing: a mapping of names to deltas, e.g. "
                          "methods: {lora: {method: lora, r: 8}, bitfit: {method: bitfit}}.")
    if "delta" in raw:
        raise ConfigError("A comparison's deltas go under methods (methods: {NAME: {method: ...}}), not delta.")
    output_dir = raw.pop("output_dir", None)
    if not output_dir:
        raise ConfigError("The comparison config needs output_dir (where the runs and the table go); add "
                          "output_dir: DIR or pass output_dir=DIR.")
    comp = Comparison(Path(output_dir), raw, [_method(name, spec) for name, spec in methods.items()], seeds,
                      isolate, metric="", greater_is_better=True)
    for m in comp.methods:  # each run config is checked as `deltatune train` would check it
        try:
            cfg = load_run_config(raw=comp.run_config(m, seeds[0], m.lrs[0] if m.lrs else None, comp.output_dir))
        except (ConfigError, UnknownMethodError) as e:  # the same error, saying which method it is about
            raise type(e)(f"methods.{m.name}: {e}") from None
        train = for_task(cfg.train, cfg.task)
        m.default_lr = cfg.delta_config().recommended_lr
        if m.lrs and not cfg.data.validation and cfg.data.validation_fraction <= 0:
            raise ConfigError(f"methods.{m.name}.lrs: a learning-rate sweep chooses on the validation split, "
                              "and this data config has none; set data.validation_fraction > 0 or data.validation.")
        comp.metric, comp.greater_is_better = train.metric, train.metric_greater_is_better
    return comp


def _method(name, spec) -> MethodSpec:
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(f"methods: the name {name!r} must be letters, digits, '_', '.' or '-' (it names a folder).")
    if not isinstance(spec, dict):
        raise ConfigError(f"methods.{name} must be a delta ({{method: lora, ...}}) or a mapping with delta, "
                          f"train and lrs, got {spec!r:.60}.")
    if "delta" not in spec:  # the shorthand: the delta itself
        spec = {"delta": spec}
    unknown = sorted(set(spec) - set(METHOD_KEYS))
    if unknown:
        raise ConfigError(f"methods.{name} has unknown keys {unknown}: its keys are {', '.join(METHOD_KEYS)} "
                          "(or write the delta itself, with its method key).")
    delta, train, lrs = spec["delta"], spec.get("train") or {}, spec.get("lrs") or []
    if not isinstance(delta, dict) or "method" not in delta:
        raise ConfigError(f"methods.{name}.delta must be a mapping with a method key, e.g. {{method: lora, r: 8}}.")
    if not isinstance(train, dict):
        raise ConfigError(f"methods.{name}.train must be a mapping of training options, got {train!r:.60}.")
    if "seed" in train:
        raise ConfigError(f"methods.{name}.train.seed: the comparison's seeds set every run's seed; remove it.")
    if not isinstance(lrs, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0
                                            for x in lrs):
        raise ConfigError(f"methods.{name}.lrs must be a list of positive learning rates, got {lrs!r:.60}.")
    if lrs and "lr" in train:
        raise ConfigError(f"methods.{name}: give either train.lr or lrs (a sweep), not both.")
    return MethodSpec(name, delta, train, [float(x) for x in lrs])
