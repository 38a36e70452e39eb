"""Dataclass configs: one base class, JSON/YAML round trip, strict keys and typed values
(core/typed.py); `PeftConvertible` marks the configs whose delta files are PEFT's format."""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar

from .errors import ConfigError, did_you_mean
from .typed import construct, field_value


@dataclasses.dataclass
class TrainingPhase:
    """One phase of a method that trains in steps (`DeltaConfig.training_phases`): its share of the
    run's optimizer steps, its own peak learning rate (None: the run's), how it changes the loss
    (`loss(loss_fn) -> loss_fn`) and what it does to the model when it ends (`after(model)`)."""
    name: str
    share: float
    lr: float | None = None
    loss: Callable | None = None
    after: Callable | None = None


@dataclasses.dataclass
class DeltaConfig:
    """Base of every method's config. Subclasses set `method` and add fields,
    each with a docstring-like `metadata={"help": ...}`."""

    method: ClassVar[str] = ""
    # options a hot-swap may change (DeltaModel.hotswap_delta): they change no tensor shape, and
    # `swap_into` hands their new values to the pieces; every other option must be equal
    swappable: ClassVar[tuple[str, ...]] = ()
    # the peak learning rate a run uses when none is set (train/config.py resolve_lr): the rate this method
    # learned at on all-MiniLM-L6-v2 + SMS spam in one epoch (docs/results.md), or the paper's where not measured
    recommended_lr: ClassVar[float] = 1e-3
    # pretrained modules of a *ForSequenceClassification-style model that train with the new head when
    # modules_to_save is left unset (core/heads.py): the rest of the head this method needs to learn
    head_extras: ClassVar[tuple[str, ...]] = ()

    modules_to_save: list[str] | None = dataclasses.field(
        default=None, metadata={"help": "extra modules (e.g. a new classification head) trained and saved whole"})

    def to_dict(self) -> dict[str, Any]:
        d = {"method": self.method}
        for f in dataclasses.fields(self):
            d[f.name] = _plain(getattr(self, f.name))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "") -> "DeltaConfig":
        """The config a dict (from JSON/YAML) describes. Unknown keys, values of the wrong type and
        values the config itself rejects are ConfigErrors; `where` names the dict in them ("delta")."""
        d = dict(d)
        d.pop("method", None)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        prefix, base = (f"{where}: " if where else ""), where or cls.method or cls.__name__
        for key in d:
            if key not in fields:
                raise ConfigError(
                    f"{prefix}{cls.__name__} has no option {key!r}.{did_you_mean(key, fields)} "
                    f"Valid options: {', '.join(sorted(fields))}.")
        kwargs = {k: field_value(cls, fields[k], v, f"{base}.{k}") for k, v in d.items()}
        return construct(cls, kwargs, base)

    def training_phases(self, model, name: str) -> list[TrainingPhase] | None:
        """The phases the Trainer runs delta `name` of `model` in, one after the other (diff pruning: a
        relaxed-L0 phase, a projection, a fixed-mask phase); None: one plain run."""
        return None

    def frozen_deltas(self) -> list[str]:
        """Attached deltas this one trains on top of (AdapterFusion's adapters): `add_delta`
        freezes them; `set_trainable(name, True)` undoes it."""
        return []

    def swap_into(self, pieces: dict) -> None:
        """Give this config's `swappable` values to the pieces {module path: piece} of a delta
        built from a config that differed only in those (nothing to do by default)."""

    def swap_problem(self, old: "DeltaConfig") -> str | None:
        """Why a delta of this config cannot be hot-swapped into one built from `old` although
        only swappable options differ, or None."""
        return None

    def replace(self, **changes) -> "DeltaConfig":
        return dataclasses.replace(self, **changes)


def _plain(v):
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


class PeftConvertible(abc.ABC):
    """Mixed into a config whose delta is written in PEFT's format (adapter_config.json with
    `peft_type`) and read back from PEFT's files. `peft_loader=False`: this method writes
    `peft_type` files but such files load through the method that owns the type (P-tuning v2
    writes PREFIX_TUNING files; its own options ride along under "deltatune")."""

    peft_type: ClassVar[str]
    peft_loader: ClassVar[bool] = True

    @abc.abstractmethod
    def to_peft_dict(self) -> dict[str, Any]:
        """PEFT's adapter_config.json for this config (model facts may be left None)."""

    @classmethod
    @abc.abstractmethod
    def from_peft(cls, d: dict[str, Any]) -> DeltaConfig:
        """The config a PEFT adapter_config.json describes."""
