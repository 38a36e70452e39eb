"""The recipe registry: a recipe is a name, an options dataclass (the YAML `recipe:` mapping)
and `run(cfg) -> results`; each recipe module registers itself when deltatune.recipes is imported."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..core.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Recipe:
    name: str
    options: type             # dataclass of the recipe's own options
    run: Callable             # run(cfg: RunConfig) -> results dict
    evaluate: Callable | None = None  # evaluate(cfg, delta_dir) -> metrics (deltatune eval)


RECIPES: dict[str, Recipe] = {}


def register_recipe(name: str, options: type, run: Callable, evaluate: Callable | None = None) -> None:
    RECIPES[name] = Recipe(name, options, run, evaluate)


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"Unknown recipe {name!r}.{did_you_mean(name, RECIPES)} Recipes: {', '.join(RECIPES)}.")
    return RECIPES[name]


def recipe_names() -> list[str]:
    return list(RECIPES)
