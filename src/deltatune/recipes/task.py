"""The plain recipe: train one delta on one task (any task type)."""
from __future__ import annotations

from dataclasses import dataclass

from .registry import register_recipe
from .common import evaluate_task, fit, phase_config, save_final, task_job


@dataclass
class TaskOptions:
    evaluate_before: bool = True  # evaluate the untrained delta first (the baseline in results.json)


def run(cfg) -> dict:
    opts = cfg.recipe_options
    job = task_job(cfg)
    result = fit(job, phase_config(cfg), evaluate_before=opts.evaluate_before)
    result["delta"] = save_final(job.model, cfg.output_dir)
    return result


register_recipe("task", TaskOptions, run, evaluate_task)
