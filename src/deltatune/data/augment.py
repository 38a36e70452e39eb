"""Counterfactual data augmentation (Zhao et al. 2018): add a transformed copy of each
training example, e.g. with gendered words swapped, so the model cannot lean on them.

An augmentation is `fn(example: dict) -> dict | None` (None: no counterfactual for this
example). Built in: "gender_swap". Others: `register_augmentation(name, fn)` in Python, or
"package.module:function" in a config."""
from __future__ import annotations

import importlib
import re
from typing import Callable

from ..core.errors import ConfigError, did_you_mean

_PAIRS = [("he", "she"), ("him", "her"), ("his", "her"), ("himself", "herself"), ("man", "woman"),
          ("men", "women"), ("boy", "girl"), ("boys", "girls"), ("father", "mother"), ("fathers", "mothers"),
          ("son", "daughter"), ("sons", "daughters"), ("brother", "sister"), ("brothers", "sisters"),
          ("husband", "wife"), ("husbands", "wives"), ("king", "queen"), ("kings", "queens"),
          ("mr", "mrs"), ("male", "female"), ("males", "females"), ("boyfriend", "girlfriend"),
          ("uncle", "aunt"), ("nephew", "niece"), ("gentleman", "lady"), ("gentlemen", "ladies"),
          ("dad", "mom"), ("grandfather", "grandmother"), ("prince", "princess"), ("actor", "actress")]
# "her" maps back to "his" (the possessive is the more frequent reading)
GENDER_SWAPS = {**{b: a for a, b in _PAIRS if b != "her"}, "her": "his", **{a: b for a, b in _PAIRS}}
_WORD = re.compile(r"[A-Za-z]+")


def _keep_case(src: str, dst: str) -> str:
    if src.isupper() and len(src) > 1:
        return dst.upper()
    return dst.capitalize() if src[0].isupper() else dst


def swap_words(text: str, table: dict[str, str]) -> str:
    return _WORD.sub(lambda m: _keep_case(m.group(), table[m.group().lower()])
                     if m.group().lower() in table else m.group(), text)


def gender_swap(example: dict, key: str = "text") -> dict | None:
    """The example with gendered words swapped (he <-> she, king <-> queen, ...), or None when
    its text has none."""
    text = example.get(key)
    if not isinstance(text, str):
        return None
    swapped = swap_words(text, GENDER_SWAPS)
    return None if swapped == text else {**example, key: swapped}


AUGMENTATIONS: dict[str, Callable] = {"gender_swap": gender_swap}


def register_augmentation(name: str, fn: Callable) -> None:
    AUGMENTATIONS[name] = fn


def get_augmentation(name: str) -> Callable:
    if name in AUGMENTATIONS:
        return AUGMENTATIONS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"Cannot import augmentation {name!r}: {e}.") from None
    raise ConfigError(f"Unknown augmentation {name!r}.{did_you_mean(name, AUGMENTATIONS)} Known: "
                      f"{', '.join(AUGMENTATIONS)}, or 'package.module:function'.")


def augment(examples: list[dict], names: list[str]) -> list[dict]:
    """The examples followed by every counterfactual the augmentations produce."""
    out = list(examples)
    for name in names:
        fn = get_augmentation(name)
        out += [c for c in map(fn, examples) if c is not None]
    return out
