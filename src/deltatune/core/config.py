"""Dataclass configs: one base class, JSON/YAML round trip, strict keys."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from .errors import ConfigError, UnknownMethodError, did_you_mean


@dataclasses.dataclass
class DeltaConfig:
    """Base of every method's config. Subclasses set `method` and add fields,
    each with a docstring-like `metadata={"help": ...}`."""

    method: ClassVar[str] = ""

    modules_to_save: list[str] | None = dataclasses.field(
        default=None, metadata={"help": "extra modules (e.g. a new classification head) trained and saved whole"})

    def to_dict(self) -> dict[str, Any]:
        d = {"method": self.method}
        for f in dataclasses.fields(self):
            d[f.name] = _plain(getattr(self, f.name))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DeltaConfig":
        d = dict(d)
        d.pop("method", None)
        names = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in names:
                raise ConfigError(
                    f"{cls.__name__} has no option {key!r}.{did_you_mean(key, names)} "
                    f"Valid options: {', '.join(sorted(names))}.")
        return cls(**d)

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


def config_from_dict(d: dict[str, Any]) -> DeltaConfig:
    """Build the config a dict describes; its key "method" names the method."""
    from .registry import get_method, method_names

    if not isinstance(d, dict) or "method" not in d:
        raise ConfigError("A delta config needs a 'method' key, e.g. {'method': 'lora', 'r': 8}. "
                          f"Known methods: {', '.join(method_names())}.")
    return get_method(d["method"]).config_cls.from_dict(d)


__all__ = ["DeltaConfig", "config_from_dict", "ConfigError", "UnknownMethodError"]
