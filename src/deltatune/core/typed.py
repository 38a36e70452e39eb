"""Values from YAML/JSON read into config dataclasses, each checked against its field's type
hint: the one checker of the delta configs and of the run config's dataclasses. `build(cls, raw)`
builds a dataclass from a mapping (unknown keys name the nearest valid one); `typed_value(tp,
value, path)` checks (and where safe converts) one value."""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal, Union

from .errors import ConfigError, did_you_mean


def build(cls, raw, where: str = ""):
    """`cls(**raw)` for a config dataclass: unknown keys are errors naming the nearest valid key,
    each value is checked against its field's type (`typed_value`), nested dataclasses built alike."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping of options ({', '.join(fields)}), "
                          f"got {_show(raw)}.")
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"Unknown key {path!r}.{did_you_mean(key, fields)} Valid keys"
                              f"{' of ' + where if where else ''}: {', '.join(fields)}.")
        kwargs[key] = field_value(cls, fields[key], value, path)
    return construct(cls, kwargs, where)


def construct(cls, kwargs: dict, where: str = ""):
    """`cls(**kwargs)`, where a value the class's own checks reject (its `__post_init__` raising
    ValueError, TypeError or AssertionError) is a ConfigError naming `where`."""
    try:
        return cls(**kwargs)
    except ConfigError as e:
        named = not where or str(e).startswith((where + ".", where + ":"))
        raise ConfigError(str(e) if named else f"{where}: {e}") from None
    except (ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"{where or cls.__name__}: {cls.__name__} rejects these options "
                          f"({type(e).__name__}: {first_line(e)}); fix the value it names.") from None


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line: our errors are one line."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def field_value(cls, f: dataclasses.Field, value, path: str):
    """`value` checked against the type of field `f` of `cls`; None is also allowed when None is
    the field's default."""
    if value is None and f.default is None:
        return None
    return typed_value(type_hints(cls).get(f.name, Any), value, path)


@functools.lru_cache(maxsize=None)
def type_hints(cls) -> dict[str, Any]:
    """The resolved type hints of a dataclass's fields; none (so: unchecked) when they cannot be
    resolved (a forward reference to a name the class's module lacks)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - any failure to resolve means "no hints", never an error
        return {}


class _Mismatch(Exception):
    def __init__(self, tp, value, path):
        super().__init__(path)
        self.tp, self.value, self.path = tp, value, path


def typed_value(tp, value, path: str):
    """`value` as a field of type `tp` holds it, else ConfigError '<path> must be <type>, got <value>'.
    Handles int, float, bool, str, list[...], dict[...], Literal[...], unions/Optional and nested
    dataclasses; bool is not an int; an int is a float; a number-like string ("1e-4", which YAML
    reads as a string) is a float; a float with no fraction is an int; one item is a one-item list;
    null for a list, mapping or dataclass is an empty one."""
    try:
        return _convert(tp, value, path, lenient=True)
    except _Mismatch as m:
        raise ConfigError(f"{m.path} must be {describe(m.tp)}, got {_show(m.value)}.{_hint(m.tp, m.value)}") from None


_NAMES = {bool: "true or false", int: "an int", float: "a number", str: "a string", dict: "a mapping",
          list: "a list", type(None): "null"}
_PLURALS = {bool: "booleans", int: "ints", float: "numbers", str: "strings"}
_UNION = (Union, types.UnionType)


def describe(tp) -> str:
    """What a value of type `tp` is, in words: 'an int', 'a string or a list of strings'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNION:
        words = [describe(a) for a in args if a is not type(None)]
        return " or ".join(words + (["null"] if type(None) in args else []))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return "a list" + (f" of {_plural(args[0])}" if args else "")
    if origin is dict:
        return "a mapping" + (f" of {_plural(args[1])}" if len(args) == 2 and args[1] is not Any else "")
    if dataclasses.is_dataclass(tp):
        return f"a mapping of options ({', '.join(f.name for f in dataclasses.fields(tp) if f.init)})"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _plural(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return "lists" + (f" of {_plural(args[0])}" if args else "")
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return "mappings"
    return _PLURALS.get(tp, f"values that are {describe(tp)}")


def _show(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _hint(tp, value) -> str:
    if not _accepts_str(tp):
        return ""
    if isinstance(value, bool):
        return " YAML reads yes/no/on/off/true/false as booleans: quote the word."
    if isinstance(value, (int, float)):
        return " Quote it to make it a string."
    return ""


def _accepts_str(tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNION:
        return any(_accepts_str(a) for a in args)
    return tp is str or (origin is list and bool(args) and _accepts_str(args[0]))


def _convert(tp, value, path, lenient):
    """`value` as type `tp`, raising _Mismatch (at the innermost path) when it is not one.
    `lenient` allows the conversions typed_value lists; unions try every member strictly first,
    so that 'all-linear' stays a string for `list[str] | str`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object or isinstance(tp, (str, typing.TypeVar)):
        return value
    if origin in _UNION:
        return _union(tp, args, value, path, lenient)
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _Mismatch(tp, value, path)
    if dataclasses.is_dataclass(tp):
        if value is None or isinstance(value, dict):
            return build(tp, value, path)
        raise _Mismatch(tp, value, path)
    if value is None:
        if tp is type(None):
            return None
        if lenient and (origin in (list, dict) or tp in (list, dict)):
            return (origin or tp)()
        raise _Mismatch(tp, value, path)
    if origin is list or tp is list:
        item = args[0] if args else Any
        if isinstance(value, (list, tuple)):
            return [_convert(item, v, f"{path}.{i}", lenient) for i, v in enumerate(value)]
        if lenient and not isinstance(value, (dict, set)):
            try:
                return [_convert(item, value, path, lenient=False)]  # one item: a one-item list
            except _Mismatch:
                raise _Mismatch(tp, value, path) from None
        raise _Mismatch(tp, value, path)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch(tp, value, path)
        key_tp, value_tp = args if len(args) == 2 else (Any, Any)
        out = {}
        for k, v in value.items():
            try:
                k = _convert(key_tp, k, path, lenient)
            except _Mismatch:
                raise _Mismatch(tp, value, path) from None
            out[k] = _convert(value_tp, v, f"{path}.{k}", lenient)
        return out
    if tp in (bool, str):
        if isinstance(value, tp):
            return value
        raise _Mismatch(tp, value, path)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if lenient and isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch(tp, value, path)
    if tp is float:
        return _float(value, path, lenient)
    return value  # another type (a callable, a tokenizer...): not ours to check


def _float(value, path, lenient):
    if isinstance(value, float):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise _Mismatch(float, value, path) from None
    if lenient and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    raise _Mismatch(float, value, path)


def _union(tp, args, value, path, lenient):
    if value is None and type(None) in args:
        return None
    members = [a for a in args if a is not type(None)]
    for converting in ((False, True) if lenient else (False,)):
        for member in members:
            try:
                return _convert(member, value, path, lenient=converting)
            except _Mismatch:
                continue
    raise _Mismatch(tp, value, path)


__all__ = ["build", "construct", "field_value", "typed_value", "type_hints", "describe", "first_line"]
