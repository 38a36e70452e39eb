"""The one registry: a method is a config class plus a `build` function.

`build(model, config)` returns {module_path: DeltaPiece} (pieces wrapped into
those modules) and may return a model-level piece under the key "" (inputs /
outputs transform, e.g. soft prompts)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import UnknownMethodError, did_you_mean


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    build: Callable
    peft_type: str | None = None


_METHODS: dict[str, Method] = {}


def register(name: str, config_cls: type, build: Callable, peft_type: str | None = None) -> None:
    """Make a method known. `peft_type` names PEFT's type when the config also
    converts to/from PEFT's adapter_config.json (`to_file_dict`/`from_peft`)."""
    config_cls.method = name
    _METHODS[name] = Method(name, config_cls, build, peft_type)


def peft_method(peft_type: str) -> Method:
    _load_builtin()
    for m in _METHODS.values():
        if m.peft_type == peft_type:
            return m
    raise UnknownMethodError(f"PEFT adapter type {peft_type!r} has no deltatune loader; supported: "
                             f"{sorted(m.peft_type for m in _METHODS.values() if m.peft_type)}.")


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    _load_builtin()
    key = str(name).lower()
    if key not in _METHODS:
        raise UnknownMethodError(
            f"Unknown delta method {name!r}.{did_you_mean(key, _METHODS)} "
            f"Known methods: {', '.join(sorted(_METHODS))}.")
    return _METHODS[key]


def method_of(config) -> Method:
    _load_builtin()
    for m in _METHODS.values():
        if type(config) is m.config_cls:
            return m
    raise UnknownMethodError(f"{type(config).__name__} is not a registered delta config; "
                             "register it with deltatune.register(name, ConfigClass, build).")


def _load_builtin():
    from .. import methods  # noqa: F401  (importing registers the built-in methods)
