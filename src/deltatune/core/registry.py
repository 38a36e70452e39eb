"""The one registry: a method is a config class plus a `build` function.

`build(model, config)` returns {module_path: piece} (pieces wrapped into those modules,
core/pieces.py) and may return a model-level piece under the key "" (inputs / outputs
transform, e.g. soft prompts). The built-in methods register themselves when the
package is imported (deltatune/__init__.py imports deltatune.methods); core imports no method."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from .config import DeltaConfig, PeftConvertible
from .typed import first_line, type_hints, typed_value
from .errors import ConfigError, DeltaError, UnknownMethodError, did_you_mean


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    build: Callable

    @property
    def peft_type(self) -> str | None:
        """PEFT's type when the config converts to/from PEFT's files, else None."""
        return self.config_cls.peft_type if issubclass(self.config_cls, PeftConvertible) else None


_METHODS: dict[str, Method] = {}


def register(name: str, config_cls: type, build: Callable) -> None:
    """Make a method known: `config_cls` (a DeltaConfig dataclass; mix in PeftConvertible for
    PEFT's file format) and `build(model, config) -> {module path: piece}`."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, DeltaConfig)):
        raise ConfigError(f"register({name!r}, ...) needs a DeltaConfig subclass, got {config_cls!r}.")
    config_cls.method = name
    _METHODS[name] = Method(name, config_cls, build)


def peft_method(peft_type: str) -> Method:
    for m in _METHODS.values():
        if m.peft_type == peft_type and m.config_cls.peft_loader:
            return m
    raise UnknownMethodError(f"PEFT adapter type {peft_type!r} has no deltatune loader; supported: "
                             f"{sorted({m.peft_type for m in _METHODS.values() if m.peft_type})}.")


def method_names() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    key = str(name).lower()
    if key not in _METHODS:
        raise UnknownMethodError(
            f"Unknown delta method {name!r}.{did_you_mean(key, _METHODS)} "
            f"Known methods: {', '.join(sorted(_METHODS))}.")
    return _METHODS[key]


def method_of(config) -> Method:
    for m in _METHODS.values():
        if type(config) is m.config_cls:
            return m
    raise UnknownMethodError(f"{type(config).__name__} is not a registered delta config; "
                             "register it with deltatune.register(name, ConfigClass, build).")


def config_from_dict(d: dict[str, Any], where: str = "delta") -> DeltaConfig:
    """Build the config a dict describes; its key "method" names the method. Unknown keys, values
    of the wrong type ("delta.r must be an int, got 'eight'") and values the method's config
    rejects are ConfigErrors naming `where`."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping with a 'method' key, e.g. {{'method': 'lora', 'r': 8}}; "
                          f"got {d!r:.60}.")
    if "method" not in d:
        raise ConfigError(f"A {where} config needs a 'method' key, e.g. {{'method': 'lora', 'r': 8}}. "
                          f"Known methods: {', '.join(method_names())}.")
    return get_method(d["method"]).config_cls.from_dict(d, where=where)


def config_from_peft(d: dict[str, Any], where: str = "PEFT config") -> DeltaConfig:
    """The config a PEFT adapter_config.json describes (its key "peft_type" names the method). A
    value the method cannot read, or one of the wrong type, is a ConfigError naming `where`."""
    method = peft_method(d.get("peft_type"))
    try:
        config = method.config_cls.from_peft(d)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except DeltaError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, AssertionError) as e:
        raise ConfigError(f"{where}: a {d.get('peft_type')} config with a value deltatune cannot read "
                          f"({type(e).__name__}: {first_line(e)}); fix the value or re-save the delta.") from None
    hints = type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in hints and not (value is None and f.default is None):
            object.__setattr__(config, f.name, typed_value(hints[f.name], value, f"{where}: {method.name}.{f.name}"))
    return config
