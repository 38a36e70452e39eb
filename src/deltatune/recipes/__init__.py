"""Recipes: short compositions of data, objective (loss_fn) and schedule over the one
training loop (`deltatune.train.Trainer`). One small file per recipe; each registers a
name, an options dataclass (the YAML `recipe:` mapping) and `run(cfg) -> results`.

| name          | what it does |
|---------------|--------------|
| task          | plain task training of the delta |
| adaptive      | continued pretraining (MLM / causal LM) on unlabelled text, then the task (DAPT/TAPT, language adapters) |
| intermediate  | train on task A, carry the delta (or fold it into the body), then train on task B |
| multitask     | several tasks at once: one shared delta, one head per task |
| joint         | task loss + lambda * LM loss on the same text (Chronopoulou 2019) |
| pet           | cloze-style: pattern + verbalizer scored with the model's own LM head (Schick & Schuetze 2021) |
| instruction   | instruction tuning on a mixture of templated tasks, zero-shot on held-out ones (FLAN) |
| ipt           | instruction prompt tuning: k nearest demonstrations (faiss) + a trained soft prompt |
| robust        | N seeds, the worst abandoned early (Dodge 2020); R3F/R4F/SMART regularisers |
"""
from __future__ import annotations

from .registry import RECIPES, Recipe, get_recipe, recipe_names, register_recipe
from . import task, adaptive, intermediate, multitask, joint, pet, instruction, ipt, robust  # noqa: F401,E402
from .common import write_results  # noqa: E402
from .run_folder import prepare  # noqa: E402
from ..train.run_start import begin_writing, deferred  # noqa: E402


def run(cfg, overwrite: bool = False, allow_changes: bool = False) -> dict:
    """Run the recipe a RunConfig names; writes run.yaml and results.json in output_dir.
    An output_dir that holds a run is refused unless cfg.train.resume (same config, or
    allow_changes) or overwrite; nothing is written before the recipe's first file."""
    with deferred(prepare(cfg, overwrite, allow_changes)):
        results = get_recipe(cfg.recipe).run(cfg)
        begin_writing()  # a recipe that wrote nothing itself
        write_results(cfg.output_dir, results)
    return results


__all__ = ["Recipe", "RECIPES", "register_recipe", "get_recipe", "recipe_names", "run"]
