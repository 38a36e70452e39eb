"""The name transformers gives the key/value cache argument, across releases.

transformers 5.24 renamed the `past_key_values` argument of models, attention modules and
`generate` to `cache` (the old name still works, with a warning, until 5.40), and model outputs
now carry `.cache`. Prefix deltas pass a cache in, so they ask here
instead of spelling either name. The answers come from public signatures and output dataclasses,
not from version numbers, so a model that migrates later is still read correctly."""
from __future__ import annotations

import dataclasses
import inspect
from functools import lru_cache

from transformers.modeling_outputs import BaseModelOutputWithPast

NAMES = ("cache", "past_key_values")  # the current name first

# the name this transformers release uses (its model outputs carry the same field)
CACHE_KWARG = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} \
    else "past_key_values"


@lru_cache(maxsize=None)
def _kwarg_of_function(fn) -> str:
    try:
        params = inspect.signature(fn).parameters  # follows functools.wraps to the real signature
    except (TypeError, ValueError):
        return CACHE_KWARG
    for name in NAMES:
        if name in params:
            return name
    return CACHE_KWARG


def cache_kwarg(module) -> str:
    """The cache argument name `module.forward` takes (the release's name if it names neither)."""
    return _kwarg_of_function(type(module).forward)


def get_cache(kwargs: dict):
    """The cache passed in kwargs under either name (None when there is none)."""
    for name in NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def set_cache(kwargs: dict, cache, name: str = CACHE_KWARG) -> dict:
    """Put `cache` into kwargs under `name`, dropping the other spelling (both raise or warn)."""
    for other in NAMES:
        kwargs.pop(other, None)
    kwargs[name] = cache
    return kwargs
