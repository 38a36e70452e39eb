"""Intermediate-task (behavioural) fine-tuning (Phang et al. 2018; Aghajanyan et al. 2021):
train the delta on a related labelled task A, then carry it to the target task B (the
run's own data/task). `carry: continue` keeps training the same delta on B (its body
part; B gets a fresh head unless `carry_head` and the heads have the same shape);
`carry: merge` folds A's delta into the body and trains a fresh delta on B."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import ConfigError
from ..core.model import DeltaModel, attach
from ..data.sources import DataConfig
from ..data.tasks import TaskConfig
from .registry import register_recipe
from .common import (carry_delta, check_train_changes, evaluate_task, evaluate_test, fit, for_task, load_body_delta,
                     load_tokenizer, phase_config, save_final, task_job)


@dataclass
class IntermediateOptions:
    data: DataConfig = field(default_factory=DataConfig)  # task A's examples
    task: TaskConfig | None = None                        # task A's type/columns (default: the run's task)
    train: dict = field(default_factory=dict)             # task A's changes to `train`
    carry: str = "continue"                               # continue | merge
    carry_head: bool = False                              # also carry A's head to B (same shape)

    def __post_init__(self):
        check_train_changes(self.train, "recipe.train")
        if self.carry not in ("continue", "merge"):
            raise ConfigError(f"recipe.carry must be continue or merge, got {self.carry!r}.")
        if not (self.data.source or self.data.train):
            raise ConfigError("recipe.data must name task A's examples (source or train).")


def run(cfg) -> dict:
    opts = cfg.recipe_options
    tok = load_tokenizer(cfg.model.path)
    job_a = task_job(cfg, data=opts.data, task=opts.task or cfg.task, tokenizer=tok)
    result = {"intermediate": fit(job_a, phase_config(cfg, "intermediate", **opts.train))}

    def prepare(base):
        if opts.carry == "continue":
            return carry_delta(job_a.model, base, heads=opts.carry_head)
        merged = carry_delta(job_a.model, base, new_name="intermediate").merge_and_unload()
        return attach(merged, cfg.delta_config())

    job_b = task_job(cfg, tokenizer=tok, prepare=prepare)
    result["target"] = fit(job_b, phase_config(cfg))
    result["delta"] = save_final(job_b.model, cfg.output_dir)
    if opts.carry == "merge":
        job_a.model.save_pretrained(Path(result["delta"]) / "intermediate")
    return result


def evaluate(cfg, delta_dir) -> dict:
    if cfg.recipe_options.carry == "continue":
        return evaluate_task(cfg, delta_dir)

    def prepare(base):
        body = load_body_delta(base, Path(delta_dir) / "intermediate", "intermediate")
        return DeltaModel.from_pretrained(body.merge_and_unload(), delta_dir)
    job = task_job(cfg, prepare=prepare)
    return evaluate_test(job, for_task(phase_config(cfg, save=False), job.task))


register_recipe("intermediate", IntermediateOptions, run, evaluate)
