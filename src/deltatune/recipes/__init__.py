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
from .common import save_run_config, write_results  # noqa: E402


def run(cfg) -> dict:
    """Run the recipe a RunConfig names; writes run.yaml and results.json in output_dir."""
    save_run_config(cfg, f"{cfg.output_dir}/run.yaml")
    results = get_recipe(cfg.recipe).run(cfg)
    write_results(cfg.output_dir, results)
    return results


__all__ = ["Recipe", "RECIPES", "register_recipe", "get_recipe", "recipe_names", "run"]
